"""The pure core: model + config -> plan -> adapters -> forward / merge.

Nothing here holds state between calls except the rule registry (the one global table); nothing
here writes into the user's model. See ``docs/how_it_works.md`` for the layers.
"""
