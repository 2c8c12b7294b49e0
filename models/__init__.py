"""Models: nn.Modules, layers, weight loading and the pieces of a checkpoint the engine reads.

Design: one concept per file. `loader` resolves where a model lives and which dtype it runs
in; `registry` maps architectures to native decoders for generation, `pooling_registry` to
native pooling models (bert, roberta, decoder_pooling) on packed batches; `pooling_config`
and `classifier_config` read how a checkpoint pools token states and what its classifier
logits mean; `transformers_encoder` / `transformers_classifier` run any other HF checkpoint
as a pooling model. Models import tritonforge.kernels, never the engine.
"""

if __name__ != "tritonforge.models":  # a bare `models`: tritonforge/shadowing.py
    from tritonforge.shadowing import defer_to_installed

    defer_to_installed(__name__, __file__)
