"""Small models with every layer type the adapter files cover, shared by the test_io*.py files."""

import copy

import torch
from torch import nn

import funclora as fl


class ConvNet(nn.Module):
    """Conv1d, Conv2d (stride), Conv3d, Linear head: input ``(B, 3, 8, 8)``.

    No dilation: PEFT 0.21's conv LoRA ignores it (issue #3697), which parity tests would hit.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(6 + 2, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))          # (B, 8, 4, 4)
        a = self.c1(h.flatten(2)).mean(-1)                              # (B, 6)
        b = self.c3(h[:, :1].unsqueeze(1)).mean((-3, -2, -1))           # (B, 2)
        return self.fc(torch.cat([a, b], -1))

    @staticmethod
    def inputs(seed=0):
        return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


class EmbNet(nn.Module):
    """Embedding (with padding_idx) and Linear: input ids ``(B, T)`` in ``[0, 20)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.out = nn.Linear(8, 20)

    def forward(self, ids):
        return self.out(self.emb(ids))

    @staticmethod
    def inputs(seed=0):
        return (torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(seed)),)


class GPT2ish(nn.Module):
    """transformers ``Conv1D`` layers (weights stored ``(in, out)``), as in GPT-2."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(24, 8)   # nf=out, nx=in
        self.c_proj = Conv1D(8, 24)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.c_proj(torch.tanh(self.c_attn(x))))

    @staticmethod
    def inputs(seed=0):
        return (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed)),)


class MHANet(nn.Module):
    """``nn.MultiheadAttention(8, 2)`` followed by a Linear: input ``(T, B, 8)``."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])

    @staticmethod
    def inputs(seed=0):
        return (torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(seed)),)


class TwoParams(nn.Module):
    """Two raw parameters, registered ``w2`` first, and a bias."""

    def __init__(self):
        super().__init__()
        self.w2 = nn.Parameter(0.3 * torch.randn(6, 6))
        self.w1 = nn.Parameter(0.3 * torch.randn(6, 6))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return x @ self.w2.T @ self.w1.T + self.bias


class ParamNet(nn.Module):
    """target_parameters on raw parameters and an LSTM: input ``(T, B, 6)``."""

    def __init__(self):
        super().__init__()
        self.raw = TwoParams()
        self.lstm = nn.LSTM(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.lstm(self.raw(x))[0])

    @staticmethod
    def inputs(seed=0):
        return (torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(seed)),)


class MLP(nn.Module):
    """The seed guide's MLP, narrow: ``(B, 20)`` in, log-probabilities ``(B, 2)`` out."""

    def __init__(self, hidden=16):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x):
        return self.seq(x)

    @staticmethod
    def inputs(seed=0):
        return (torch.randn(4, 20, generator=torch.Generator().manual_seed(seed)),)


class Layers(nn.Module):
    """12 blocks with q / v / o Linears (24 q+v targets make PEFT condense the target list)."""

    def __init__(self, n=12):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({k: nn.Linear(4, 4) for k in "qvo"}) for _ in range(n))

    def forward(self, x):
        for block in self.layers:
            x = block["o"](torch.tanh(block["q"](x) + block["v"](x)))
        return x

    @staticmethod
    def inputs(seed=0):
        return (torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)),)


class LSTMRule(fl.Rule):
    """A user rule for ``nn.LSTM`` (the seed's example): adapts layer 0's two weight matrices."""

    def factors(self, module, r):
        gates, inp = module.weight_ih_l0.shape
        return {"lora_A": fl.Factor((r, inp), "A"), "lora_B": fl.Factor((gates, r), "B"),
                "hh.lora_A": fl.Factor((r, module.hidden_size), "A"), "hh.lora_B": fl.Factor((gates, r), "B")}

    def updated_parameters(self, module):
        return ("weight_ih_l0", "weight_hh_l0")

    def delta(self, module, factors, scaling):
        return {"weight_ih_l0": scaling * factors["lora_B"] @ factors["lora_A"],
                "weight_hh_l0": scaling * factors["hh.lora_B"] @ factors["hh.lora_A"]}

    def file_key(self, leaf):
        return leaf + ".weight"


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])

    inputs = ParamNet.inputs


def build(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def random_adapter(lora, seed=0, scale=0.2, dtype=None):
    """Every leaf random (a fresh adapter has B = 0, which would hide misplaced factors)."""
    g = torch.Generator().manual_seed(seed)
    return {p: {k: (scale * torch.randn(v.shape, generator=g)).to(dtype or v.dtype) for k, v in leaves.items()}
            for p, leaves in lora.init().items()}


def peft_model(model, kwargs):
    """PEFT's model on a deep copy of ``model`` with every trainable tensor random."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


def doubled_out_proj(adapter):
    """PEFT 0.21.2 applies an MHA's out_proj delta twice (PEFT_LORA_SEMANTICS.md §2.5)."""
    out = {p: dict(leaves) for p, leaves in adapter.items()}
    for leaves in out.values():
        if "out_proj.lora_B" in leaves:
            leaves["out_proj.lora_B"] = 2 * leaves["out_proj.lora_B"]
    return out
