"""The model card (``README.md``) of a hub folder: Hub front matter plus usage, results and citation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCardData

__all__ = ["SOURCE_REPO", "render_model_card", "with_onnx_section"]

SOURCE_REPO = "ssole-hub/ssole-hub"
"""GitHub ``owner/name`` of this project, for the ``torch.hub.load`` example."""

CITATION = """\
@inproceedings{huang2025ssole,
  title={SSOLE: Rethinking Orthogonal Low-rank Embedding for Self-Supervised Learning},
  author={Huang, Lun and Qiu, Qiang and Sapiro, Guillermo},
  booktitle={The Thirteenth International Conference on Learning Representations},
  year={2025}
}"""


def _flatten(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name} / "))
        else:
            rows.append((name, value))
    return rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_PROTOCOL_NAMES = {"knn": "weighted kNN", "linear": "linear probe"}
# Keys of an evaluation JSON that describe the run, not a result of this model.
_RUN_KEYS = ("model", "random_init", "dataset", "protocols", "seconds")


def _protocol_rows(dataset: str, protocols: Mapping[str, Any]) -> list[str]:
    rows = []
    for key, value in protocols.items():
        if isinstance(value, Mapping):
            settings = ", ".join(f"{k}={_format(v)}" for k, v in value.items() if k != "top1")
            top1 = _format(value.get("top1", "-"))
            rows.append(
                f"| {dataset} | {_PROTOCOL_NAMES.get(key, key)} top-1 | {top1} | {settings} |"
            )
        elif key == "rankme":
            rows.append(
                f"| {dataset} | RankMe (effective rank) | {_format(value)} | train features |"
            )
        else:
            rows.append(f"| {dataset} | {key} | {_format(value)} | |")
    return rows


def _results_table(eval_results: Mapping[str, Any]) -> str:
    if not eval_results:
        return "No evaluation results were recorded for this checkpoint."
    parts = []
    if eval_results.get("random_init"):
        parts.append(
            "**These results were measured on the architecture at random initialisation (a "
            "baseline), not on this model's weights.**"
        )
    protocols = eval_results.get("protocols")
    rest = eval_results
    if isinstance(protocols, Mapping):
        dataset = str(eval_results.get("dataset", "-"))
        lines = ["| dataset | metric | value | settings |", "| --- | --- | --- | --- |"]
        parts.append("\n".join(lines + _protocol_rows(dataset, protocols)))
        rest = {k: v for k, v in eval_results.items() if k not in _RUN_KEYS}
    rows = [(name, value) for name, value in _flatten(rest) if name not in _RUN_KEYS[:2]]
    if rows:
        lines = ["| metric | value |", "| --- | --- |"]
        parts.append("\n".join(lines + [f"| {n} | {_format(v)} |" for n, v in rows]))
    return "\n\n".join(parts)


def _training_summary(metadata: Mapping[str, Any]) -> str:
    keys = ("dataset", "epochs", "views", "batch_size", "method", "lambda_", "seed")
    rows = [
        (k, metadata[k]) for k in keys if k in metadata and not isinstance(metadata[k], Mapping)
    ]
    if not rows:
        return "Training metadata is in `ssole.json`."
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_format(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n\nThe full training configuration is in `ssole.json`."


def render_model_card(
    *,
    repo_id: str,
    architecture: str,
    timm_architecture: str,
    num_features: int,
    projector_config: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
    eval_results: Mapping[str, Any],
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    hub_tag: str | None = None,
) -> str:
    """Return the text of a model card for a hub folder.

    The front matter (``library_name: timm``, ``pipeline_tag: image-feature-extraction``, license,
    tags, datasets) is what the Hub indexes; the body shows how to load the model with timm,
    torch.hub and over HTTP, the measured evaluation results, and the citation.
    """
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        license=license,
        tags=[
            "image-feature-extraction",
            "self-supervised-learning",
            "ssole",
            "timm",
            *(tags or []),
        ],
        datasets=datasets or None,
    )
    projector = (
        "no projector was exported"
        if projector_config is None
        else (
            f"projector `{projector_config.get('in_dim')} -> {projector_config.get('hidden_dim')}"
            f" -> {projector_config.get('out_dim')}` ({projector_config.get('depth')} linear layers)"
            " in `projector.safetensors`"
        )
    )
    # A released recipe also has a named entry point; any repo loads through the generic one.
    torch_hub_named = (
        f'\n# the released recipe, by name\nmodel = torch.hub.load("{SOURCE_REPO}", "{architecture}", tag="{hub_tag}")'
        if hub_tag and architecture.startswith("ssole_")
        else ""
    )
    return f"""---
{card_data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A {timm_architecture} backbone pre-trained without labels with **SSOLE** (Self-Supervised
Orthogonal Low-rank Embedding, ICLR 2025). It outputs {num_features}-d pooled features (no
classifier); the {projector}.

The weights in `model.safetensors` use timm's key names and `config.json` follows timm's schema,
so plain timm loads this repo without any other package. Preprocessing (input size, crop,
interpolation, mean and std) is in `config.json` and timm resolves it from the model.

## Usage

### timm

```python
import timm
import torch
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
with torch.inference_mode():
    features = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0))  # (1, {num_features})
```

With the SSOLE Hub package (adds the projector, `with_projector=True`):

```python
import ssole_hub

model = ssole_hub.load_model("hf-hub:{repo_id}", with_projector=True)
```

### torch.hub

```python
import torch

model = torch.hub.load("{SOURCE_REPO}", "load_model", "hf-hub:{repo_id}"){torch_hub_named}
```

### HTTP

Serve it with the SSOLE Hub server (from a checkout of the project), then post images:

```bash
python -m server --model hf-hub:{repo_id}
curl -s http://localhost:8000/v1/embeddings -H 'Content-Type: application/json' \\
  -d '{{"input": ["data:image/jpeg;base64,'"$(base64 -w0 photo.jpg)"'"], "normalize": true}}'
```

## Results

{_results_table(eval_results)}

## Training

{_training_summary(metadata)}

## Citation

```bibtex
{CITATION}
```
"""


ONNX_SECTION = "## ONNX backends"


def _onnx_section(record: Mapping[str, Any]) -> str:
    photos = record.get("guard_photos") or {}
    lines = [
        ONNX_SECTION,
        "",
        "`onnx/` holds ONNX exports for fast CPU inference with OpenVINO (input `images`, dynamic"
        " batch; outputs `backbone` and, with a projector, `projector`). Each backend was checked"
        f" against float32 torch on {photos.get('count', '?')} real photos"
        f" ({photos.get('source', '?')}): the smallest cosine similarity, and the share of each"
        " photo's nearest neighbours that stay the same.",
        "",
        "| backend | file | precision | output | min cosine (limit) | neighbour agreement | passed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend, figures in (record.get("backends") or {}).items():
        agreement = figures.get("neighbour_agreement") or {}
        for output, cosine in figures["min_cosine"].items():
            share = f"{agreement[output]:.4f}" if output in agreement else "n/a"
            lines.append(
                f"| {backend} | `{figures['file']}` | {figures.get('precision', 'f32')} | {output}"
                f" | {cosine:.6f} ({figures['limit']}) | {share} | {figures.get('passed', True)} |"
            )
    lines += [
        "",
        "```bash",
        "python -m server --model local-dir:FOLDER --backend onnx  # or onnx-bf16, onnx-int8, auto",
        "```",
    ]
    return "\n".join(lines) + "\n\n"


def with_onnx_section(card: str, record: Mapping[str, Any]) -> str:
    """``card`` with its ONNX backends section (fidelity figures of ``record``, the ``"onnx"``
    entry of ``ssole.json``) written or replaced, before the citation."""
    start = card.find(ONNX_SECTION)
    if start >= 0:
        end = card.find("\n## ", start + len(ONNX_SECTION))
        card = card[:start] + (card[end + 1 :] if end >= 0 else "")
    anchor = card.find("## Citation")
    anchor = anchor if anchor >= 0 else len(card)
    return card[:anchor] + _onnx_section(record) + card[anchor:]
