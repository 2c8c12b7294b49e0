"""Layers shared by the native models: tensor-parallel-ready linears, norms, rotary
embeddings, gated activations, vocabulary embeddings and paged attention.

Each layer owns how its parameters are loaded (`param.weight_loader`), so model files only
wire layers together and name them like the checkpoint does.
"""
