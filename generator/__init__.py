"""The `generator` CLI: inspect / build / serve; never imports torch or the engine."""

if __name__ != "tritonforge.generator":  # a bare `generator`: tritonforge/shadowing.py
    from tritonforge.shadowing import defer_to_installed

    defer_to_installed(__name__, __file__)
