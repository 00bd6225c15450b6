"""The model card (``README.md``) of a hub folder, in the shape of timm's cards: Hub front matter,
Model Details (size and cost measured at export, paper, dataset, recipe), Usage, Evaluation (the
results with their protocol) and the citation; :func:`with_onnx_section` adds the ONNX backends,
:func:`with_pca_section` the compact embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCardData

from ssole_hub.hub.model_stats import ModelStats

__all__ = ["SOURCE_REPO", "render_model_card", "with_onnx_section", "with_pca_section"]

SOURCE_REPO = "ssole-hub/ssole-hub"
"""GitHub ``owner/name`` of this project, for the ``torch.hub.load`` example."""

CITATION = """\
@inproceedings{huang2025ssole,
  title={SSOLE: Rethinking Orthogonal Low-rank Embedding for Self-Supervised Learning},
  author={Huang, Lun and Qiu, Qiang and Sapiro, Guillermo},
  booktitle={The Thirteenth International Conference on Learning Representations},
  year={2025}
}"""
PAPER = (
    "SSOLE: Rethinking Orthogonal Low-rank Embedding for Self-Supervised Learning"
    " (Huang, Qiu and Sapiro, ICLR 2025)"
)


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
        return "The training metadata is in `ssole.json`."
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_format(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n\nThe full training configuration is in `ssole.json`."


def _model_details(ssole: Mapping[str, Any]) -> str:
    stats = ModelStats.from_dict(ssole["model_stats"])
    metadata = ssole.get("metadata") or {}
    projector = ssole.get("projector_config")
    projector_text = (
        "none exported"
        if not projector
        else f"`{projector.get('in_dim')} -> {projector.get('hidden_dim')} ->"
        f" {projector.get('out_dim')}` ({projector.get('depth')} linear layers, "
        "`projector.safetensors`)"
    )
    height, width = stats.image_size
    return f"""- **Model type:** image feature backbone, self-supervised ({ssole["num_features"]}-d pooled features, no classifier)
- **Model stats** (backbone, one image, measured at export):
  - Params (M): {stats.params_m:.1f}
  - GMACs: {stats.gmacs:.2f}
  - Activations (M): {stats.activations_m:.2f}
  - Image size: {height} x {width}
- **Architecture:** timm `{ssole["timm_architecture"]}` (trained as `{ssole["architecture"]}`)
- **Projector:** {projector_text}
- **Paper:** {PAPER}
- **Dataset:** {_format(metadata.get("dataset", "not recorded"))}
- **Original:** [SSOLE Hub](https://github.com/{SOURCE_REPO})

### Training recipe

{_training_summary(metadata)}"""


def _feature_map_comment(stats: ModelStats) -> str:
    shapes = ", ".join(f"({c}, {h}, {w})" for c, h, w in stats.feature_maps)
    return f"  # one map per stage: {shapes}" if shapes else ""


def _usage(ssole: Mapping[str, Any], repo_id: str, hub_tag: str | None) -> str:
    stats = ModelStats.from_dict(ssole["model_stats"])
    architecture = ssole["architecture"]
    # A released recipe also has a named entry point; any repo loads through the generic one.
    torch_hub_named = (
        "\n# the released recipe, by name\n"
        f'model = torch.hub.load("{SOURCE_REPO}", "{architecture}", tag="{hub_tag}")'
        if hub_tag and architecture.startswith("ssole_")
        else ""
    )
    return f"""### Image embeddings (timm)

```python
import timm
import torch
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
with torch.inference_mode():
    features = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0))  # (1, {ssole["num_features"]})
```

With the SSOLE Hub package (adds the projector, `with_projector=True`):

```python
import ssole_hub

model = ssole_hub.load_model("hf-hub:{repo_id}", with_projector=True)
```

### Feature maps (timm)

Continuing the example above, one map per stage instead of pooled features:

```python
model = timm.create_model("hf-hub:{repo_id}", pretrained=True, features_only=True).eval()
with torch.inference_mode():
    maps = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0))
print([tuple(m.shape[1:]) for m in maps]){_feature_map_comment(stats)}
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
```"""


EVALUATION_PROTOCOL = (
    "Measured on frozen backbone features, with the preprocessing of `config.json`, by the"
    " project's evaluation (`python -m training.evaluate`): **weighted kNN** top-1 (cosine"
    " similarity, `k` neighbours weighted by `exp(similarity / T)`), a **linear probe** (top-1 of"
    " a linear classifier trained on the frozen features) and **RankMe** (the effective rank of"
    " the train features, a label-free check for collapse). A `knn_top1` without settings was"
    " recorded by the training run's own kNN monitor."
)


def _origin(ssole: Mapping[str, Any]) -> str:
    """What the weights are: SSOLE pre-training, or a converted torchvision checkpoint."""
    arch = ssole["timm_architecture"]
    source = ((ssole.get("metadata") or {}).get("converted_from") or {}).get("source")
    if source == "torchvision":
        return (
            f"A {arch} backbone converted from a torchvision checkpoint with `ssole-hub convert`;"
            " how it was trained is not recorded here."
        )
    return (
        f"A {arch} backbone pre-trained without labels with **SSOLE** (Self-Supervised"
        " Orthogonal Low-rank Embedding, ICLR 2025)."
    )


def render_model_card(
    ssole: Mapping[str, Any],
    *,
    repo_id: str,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    hub_tag: str | None = None,
) -> str:
    """Return the text of the model card (``README.md``) of a hub folder.

    Args:
        ssole: the folder's ``ssole.json`` record: ``architecture``, ``timm_architecture``,
            ``num_features``, ``projector_config``, ``model_stats``
            (:meth:`~ssole_hub.hub.model_stats.ModelStats.to_dict`), ``metadata`` and
            ``eval_results``; every figure on the card comes from it.
        repo_id: the Hub repo the card's examples load.
        license, datasets, tags: the front matter the Hub indexes (besides ``library_name:
            timm`` and ``pipeline_tag: image-feature-extraction``).
        hub_tag: the released recipe's tag, which adds a named ``torch.hub`` example.

    The body has Model Details (size and cost, paper, dataset, training recipe), Usage (timm
    embeddings and feature maps, the SSOLE Hub loader, torch.hub, HTTP), the evaluation results
    with their protocol, and the citation; :func:`with_onnx_section` adds the ONNX backends.

    Raises:
        KeyError: ``ssole`` lacks one of the keys above.
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
    return f"""---
{card_data.to_yaml()}
---

# {repo_id.split("/")[-1]}

{_origin(ssole)} It outputs {ssole["num_features"]}-d pooled features.

The weights in `model.safetensors` use timm's key names and `config.json` follows timm's schema,
so plain timm loads this repo without any other package. Preprocessing (input size, crop,
interpolation, mean and std) is in `config.json` and timm resolves it from the model.

## Model Details

{_model_details(ssole)}

## Usage

{_usage(ssole, repo_id, hub_tag)}

## Evaluation

{EVALUATION_PROTOCOL}

{_results_table(ssole.get("eval_results") or {})}

## Citation

```bibtex
{CITATION}
```
"""


ONNX_SECTION = "### ONNX backends"
OLD_ONNX_SECTIONS = ("## ONNX Runtime",)
"""Headings earlier versions wrote, replaced when the section is written again."""


def _cosine(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else _format(value)


def _onnx_section(record: Mapping[str, Any]) -> str:
    photos = record.get("guard_photos") or {}
    backends = record.get("backends") or {}
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
    # Any backend the record holds is listed, with whatever of these figures it has.
    for backend, figures in backends.items():
        agreement = figures.get("neighbour_agreement") or {}
        file, limit = figures.get("file", "-"), _format(figures.get("limit", "-"))
        precision, passed = figures.get("precision", "-"), figures.get("passed", "-")
        if figures.get("written") is False:
            passed = f"{passed} (file refused, not written)"
        for output, cosine in (figures.get("min_cosine") or {"-": "-"}).items():
            share = _cosine(agreement[output]) if output in agreement else "n/a"
            lines.append(
                f"| {backend} | `{file}` | {precision} | {output} | {_cosine(cosine)} ({limit})"
                f" | {share} | {passed} |"
            )
    refused = {b: f for b, f in backends.items() if f.get("written") is False}
    for backend, figures in refused.items():
        lines += [
            "",
            f"`{figures.get('file')}` was refused at export and is not in this folder: "
            f"{'; '.join(figures.get('shortfalls') or [])}. The `{backend}` backend is not "
            "available.",
        ]
    present = [b for b in backends if b not in refused]
    choices = ", ".join([*present[1:], "torch", "auto"])
    first = next(iter(present), "torch")
    lines += [
        "",
        "```bash",
        f"python -m server --model local-dir:FOLDER --backend {first}  # or {choices}",
        "```",
    ]
    return "\n".join(lines) + "\n\n"


def _with_section(card: str, section: str, headings: tuple[str, ...]) -> str:
    """``card`` with ``section`` in place of any section under one of ``headings`` (each up to
    the next ``##`` or ``###`` heading), at the end of the usage."""
    for heading in headings:
        start = card.find(heading + "\n")
        if start >= 0:
            ends = [card.find(h, start + len(heading)) for h in ("\n## ", "\n### ")]
            end = min((e for e in ends if e >= 0), default=-1)
            card = card[:start] + (card[end + 1 :] if end >= 0 else "")
    anchors = [card.find(h) for h in ("## Evaluation", "## Citation")]
    anchor = next((a for a in anchors if a >= 0), len(card))
    return card[:anchor] + section + card[anchor:]


def with_onnx_section(card: str, record: Mapping[str, Any]) -> str:
    """``card`` with its ONNX backends section (the backends and fidelity figures of ``record``,
    the ``"onnx"`` entry of ``ssole.json``) written or replaced, at the end of the usage."""
    return _with_section(card, _onnx_section(record), (ONNX_SECTION, *OLD_ONNX_SECTIONS))


PCA_SECTION = "### Compact embeddings"


def _pca_section(record: Mapping[str, Any]) -> str:
    whitening = "with whitening" if record.get("whiten") else "without whitening"
    lines = [
        PCA_SECTION,
        "",
        f"`pca.safetensors` holds a PCA of the {record.get('input_dimensions', '?')}-d"
        f" `{record.get('output', '?')}` embeddings, fitted on {record.get('images', '?')} images"
        f" with `ssole-hub fit-pca`, {whitening}. Any size from 1 to"
        f" {record.get('max_dimensions', '?')} can be asked for with `dimensions`; each vector is"
        " projected on the first principal axes and L2-normalised. The variance each size keeps"
        " (share of the embeddings' total variance, on the images it was fitted on):",
        "",
        "| dimensions | variance kept | bytes per image (float32) |",
        "| ---: | ---: | ---: |",
    ]
    for size, share in (record.get("variance_kept") or {}).items():
        lines.append(f"| {size} | {100 * float(share):.1f}% | {4 * int(size)} |")
    lines += [
        "",
        "```python",
        "from ssole_hub import FeatureExtractor",
        "",
        'fx = FeatureExtractor.from_pretrained("local-dir:FOLDER")',
        'emb = fx.embed(["photo.jpg"], dimensions=128)  # (1, 128), unit rows',
        "```",
        "",
        "Over HTTP (`python -m server`), `dimensions` is OpenAI's field of `/v1/embeddings`.",
    ]
    return "\n".join(lines) + "\n\n"


def with_pca_section(card: str, record: Mapping[str, Any]) -> str:
    """``card`` with its compact embeddings section (the ``"pca"`` entry of ``ssole.json``:
    output, images, whitening, the variance kept at each size) written or replaced, at the end
    of the usage."""
    return _with_section(card, _pca_section(record), (PCA_SECTION,))
