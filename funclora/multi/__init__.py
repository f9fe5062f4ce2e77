"""Many adapters at once: per-example routing (``route``) and mixing (``combine``)."""
