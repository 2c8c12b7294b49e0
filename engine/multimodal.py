"""Images in a generate request: decoding and limits, the model's HF processor, and what a
request carries into the engine.

Design: a front end (the offline `LLM`, the Triton tokenizer step) turns a prompt and its
images into prompt token ids (placeholders expanded by the model's own processor) and a
`MultiModalData`: the processor's image tensors (pixel_values, image_grid_thw,
image_sizes, ...) plus a content hash. The engine core never sees images or strings: it
computes the layout (models/transformers_multimodal.py), encodes the images once and merges
the rows in the steps that prefill their placeholders. The content hash salts the prefix
cache's key of every block that holds image tokens, so the same prompt with another image
never reuses K/V.

Limits (checked before the processor runs, errors name the field): images per request,
encoded bytes per image, pixels per image; only `data:` URLs are accepted, never fetched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_BYTES = 20 << 20  # encoded
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded: a small PNG may decode to gigabytes


@dataclass
class MultiModalData:
    """A request's images as its model's processor prepared them (CPU tensors)."""

    encoder_inputs: dict[str, torch.Tensor]
    content_hash: int  # 63 bits: fits the prefix cache's int64 block keys
    num_images: int

    def to_bytes(self) -> bytes:
        """safetensors bytes (no pickle): what the Triton tokenizer step hands the engine
        step in its `mm_data` tensor."""
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self.encoder_inputs.items()},
                    metadata={"content_hash": str(self.content_hash),
                              "num_images": str(self.num_images)})

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # Pickled as safetensors bytes: torch's own tensor pickling (multiprocessing
        # reductions) shares file descriptors, which an unrelated process (the engine core
        # behind its socket) cannot take.
        return (MultiModalData.from_bytes, (self.to_bytes(),))

    @classmethod
    def from_bytes(cls, data: bytes, field: str = "mm_data") -> MultiModalData:
        from safetensors.torch import load

        try:
            data = bytes(data)
            tensors = load(data)
            # The metadata sits in the JSON header after its 8-byte little-endian length.
            (header_len,) = struct.unpack("<Q", data[:8])
            metadata = json.loads(data[8:8 + header_len])["__metadata__"]
            return cls(tensors, int(metadata["content_hash"]), int(metadata["num_images"]))
        except Exception as err:  # noqa: BLE001 - anything malformed is the request's
            raise ValueError(f"{field}: not image data from the tokenizer step ({err})"
                             ) from None


def content_hash(encoder_inputs: dict[str, torch.Tensor]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(encoder_inputs):
        tensor = encoder_inputs[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return int.from_bytes(digest.digest(), "little") >> 1


def decode_image(data: Any, field: str) -> Any:
    """A PIL image from a PIL image, encoded bytes, base64 text or a `data:` URL; ValueError
    naming `field` for anything else (a URL that is not data:, not an image, too large)."""
    from PIL import Image

    if isinstance(data, Image.Image):
        return _check_pixels(data, field)
    if isinstance(data, str):
        text = data.strip()
        if text.startswith("data:"):
            header, _, text = text.partition(",")
            if ";base64" not in header:
                raise ValueError(f"{field}: a data: URL must be base64 (data:image/png;base64,...)")
        elif "://" in text[:16]:
            raise ValueError(f"{field}: only data: URLs are accepted (the server never fetches "
                             f"a URL); got {text[:40]!r}")
        if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ValueError(f"{field}: the image is larger than {MAX_IMAGE_BYTES} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{field}: not base64 image data or a data: URL") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{field}: an image must be encoded bytes, base64 text or a data: URL; "
                         f"got {type(data).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{field}: the image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        _check_pixels(image, field)
        image.load()
    except Image.DecompressionBombError:
        raise ValueError(f"{field}: the image has more than {MAX_IMAGE_PIXELS} pixels") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{field}: not a decodable image (PNG, JPEG, WebP, GIF, BMP, ...)"
                         ) from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(field):
            raise
        raise ValueError(f"{field}: not a decodable image ({err})") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_pixels(image: Any, field: str) -> Any:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{field}: the image is {width}x{height}, more than {MAX_IMAGE_PIXELS} "
                         "pixels")
    if width < 1 or height < 1:
        raise ValueError(f"{field}: the image is empty ({width}x{height})")
    return image


class ImageProcessor:
    """The model's HF processor (AutoProcessor from its folder): text with image
    placeholders plus images -> prompt ids and MultiModalData."""

    def __init__(self, model_dir: str | Path, trust_remote_code: bool = False) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir,
                                                       trust_remote_code=trust_remote_code)
        tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or getattr(
            tokenizer, "image_token", None)
        # Gemma 3 writes <start_of_image> where an image goes and expands it itself.
        self.image_marker = getattr(self.processor, "boi_token", None) or self.image_token

    def process(self, prompt: str, images: list[Any], field: str = "images"
                ) -> tuple[list[int], MultiModalData | None]:
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"{field}: {len(images)} images, at most {MAX_IMAGES_PER_REQUEST} "
                             "per request")
        decoded = [decode_image(image, f"{field}[{i}]") for i, image in enumerate(images)]
        if not decoded:
            ids = self.processor.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return list(ids), None
        markers = prompt.count(self.image_marker) if self.image_marker else 0
        if markers != len(decoded):
            raise ValueError(
                f"{field}: {len(decoded)} image(s) but the prompt holds {markers} image "
                f"placeholder(s) {self.image_marker!r}; put one where each image goes (a chat "
                "message's image parts do)")
        try:
            out = self.processor(text=[prompt], images=decoded, return_tensors="pt")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{field}: the model's processor refused the images: {err}") from None
        from tritonforge.models.transformers_multimodal import TOKEN_LEVEL_INPUTS

        encoder_inputs = {k: v for k, v in out.items()
                          if k not in TOKEN_LEVEL_INPUTS and isinstance(v, torch.Tensor)}
        ids = out["input_ids"][0].tolist()
        return ids, MultiModalData(encoder_inputs, content_hash(encoder_inputs), len(decoded))


def chat_images(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style content parts -> (messages whose image parts are {"type": "image"}, as HF
    chat templates render them, and the images' data URLs in order)."""
    messages, images = [], []
    for i, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "image"):
                url = part.get("image_url", part.get("image"))
                url = url.get("url") if isinstance(url, dict) else url
                if url is None:
                    raise ValueError(f"messages[{i}].content[{j}]: an image part needs "
                                     "image_url.url (a data: URL)")
                images.append(url)
                parts.append({"type": "image"})
            else:
                parts.append(part)
        messages.append({**message, "content": parts})
    return messages, images
