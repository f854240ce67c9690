"""Tools that read a config or a run without training it: model summary (params, FLOPs), AOT memory report."""
