"""OpenAI Triton kernels, each beside its PyTorch reference (`<op>`, `<op>_ref`)."""

if __name__ != "tritonforge.kernels":  # a bare `kernels`: tritonforge/shadowing.py
    from tritonforge.shadowing import defer_to_installed

    defer_to_installed(__name__, __file__)
