"""A step's image rows for a vision-language model: which step rows take which encoded image
rows, M-RoPE positions and bidirectional spans (models/transformers_multimodal.py).

Called by the runner after InputBatch built the step and before the one host-to-device copy
of its integer arrays: for M-RoPE models it shifts the 1-D positions of tokens past the
prompt by the request's delta in place (so decode steps, CUDA graphs included, need nothing
else). A sequence's images are encoded when a chunk first needs them and the rows are
dropped once its prompt is computed (a preempted sequence re-encodes them).
"""

from __future__ import annotations

import numpy as np
import torch
from tritonforge.engine.input_batch import HostInputs
from tritonforge.engine.sequence import Sequence
from tritonforge.models.transformers_multimodal import MultimodalStep


def multimodal_step(model: torch.nn.Module, host: HostInputs,
                    scheduled: list[tuple[Sequence, int]], device: torch.device
                    ) -> MultimodalStep | None:
    """The step's MultimodalStep (None when no scheduled row is an image row and no M-RoPE
    table is needed); shifts `host.positions` past the prompt by each request's M-RoPE
    delta."""
    step_rows: list[np.ndarray] = []
    embed_parts: list[torch.Tensor] = []
    table_rows: list[tuple[np.ndarray, np.ndarray]] = []  # (step rows, [3, R] positions)
    spans: list[tuple[int, int, int, int, int]] = []
    starts = host.query_start_loc
    for b, (seq, n) in enumerate(scheduled):
        state = seq.mm
        if state is None:
            continue
        layout, first_row = state.layout, int(starts[b])
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        prompt_end = min(end, seq.num_prompt_tokens)
        if layout.mrope_delta and end > seq.num_prompt_tokens:  # past the prompt: index + delta
            past = max(start, seq.num_prompt_tokens)
            host.positions[first_row + past - start:first_row + n] += layout.mrope_delta
        if start >= prompt_end:
            continue
        if layout.mrope_positions is not None:
            table_rows.append((np.arange(first_row, first_row + prompt_end - start),
                               layout.mrope_positions[:, start:prompt_end]))
        rows = layout.rows[start:prompt_end]
        image = rows >= 0
        if image.any():
            if state.embeds is None:
                state.embeds = model.encode(state.data.encoder_inputs, device)
            step_rows.append(first_row + np.flatnonzero(image))
            embed_parts.append(state.embeds[torch.from_numpy(rows[image]).to(device)])
        for span_start, span_end in layout.spans:
            if span_start < end and span_end > start:  # chunks never end inside a span
                row_begin = first_row + max(span_start, start) - start
                spans.append((row_begin, first_row + span_end - start, b, span_start, span_end))
        if prompt_end == seq.num_prompt_tokens:
            state.embeds = None  # the prompt is computed after this step
    if not step_rows and not table_rows:
        return None
    hidden = model.language_model.config.hidden_size
    mm = MultimodalStep(
        embeds=(torch.cat(embed_parts) if embed_parts
                else torch.empty(0, hidden, device=device)),
        rows=torch.from_numpy(np.concatenate(step_rows) if step_rows
                              else np.empty(0, np.int64)).to(device),
        spans=spans)
    if table_rows:
        positions = np.repeat(host.positions[None], 3, axis=0)  # [3, N]
        for rows_, table in table_rows:
            positions[:, rows_] = table
        mm.mrope_positions = torch.from_numpy(positions).to(device)
    return mm
