"""Models: nn.Modules, layers, weight loading and the pieces of a checkpoint the engine reads.

Design: one concept per file. `loader` resolves where a model lives and which dtype it runs
in; `pooling_config` reads how a checkpoint pools token states into an embedding
(sentence-transformers files, else the architecture family's default);
`transformers_encoder` runs any `transformers.AutoModel` checkpoint as a pooling model
until a native implementation exists. Native models and the architecture registry land
with the models issue. Models import tritonforge.kernels, never the engine.
"""
