"""Hugging Face ``transformers`` models: keep ``config`` in step with compressed FFNs.

After merging, a model's FFN layers are narrower than its config says
(``config.ffn_dim`` of OPT still holds the old width), so ``save_pretrained``
followed by ``from_pretrained`` builds the old shapes and fails with a size
mismatch. :func:`update_config` writes the new width into the config field that
holds it, found through a small table per config class (:data:`FFN_FIELDS`);
:func:`save_pretrained` does that and saves. The plain
``model.save_pretrained`` works too once :func:`update_config` has run.

A config holds one FFN width for all layers. When the compressed widths differ
between layers, it cannot express the model and :func:`update_config` refuses
with :class:`~neuron_merging.ConfigError`: compress every FFN with the same
``ratio`` (no per-layer ``keep=``, no ``exclude=`` of FFN layers) to keep them
uniform, or save with :func:`neuron_merging.save`, which records every layer.

``transformers`` is imported by nothing here: the functions only read the
model's modules and its ``config`` object.

Example::

    >>> import tempfile, torch, transformers, neuron_merging as nm
    >>> config = transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32,
    ...     num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16)
    >>> model = transformers.OPTForCausalLM(config).eval()
    >>> groups = [nm.MergeGroup(producer=f"model.decoder.layers.{i}.fc1",
    ...                         consumer=f"model.decoder.layers.{i}.fc2") for i in range(2)]
    >>> result = nm.merge(model, groups=groups, ratio=0.25, threshold=None)
    >>> nm.hf.update_config(result).ffn_dim
    24
    >>> folder = tempfile.mkdtemp()
    >>> nm.hf.save_pretrained(result, folder)
    >>> transformers.OPTForCausalLM.from_pretrained(folder).config.ffn_dim
    24
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core.errors import ConfigError, ModelError

__all__ = ["FFN_FIELDS", "FfnField", "ffn_widths", "save_pretrained", "update_config"]


@dataclass(frozen=True)
class FfnField:
    """Where one config field's FFN width lives in the model.

    Attributes:
        field: the config attribute (``ffn_dim``, ``d_ff``, ``intermediate_size``...).
        producers: a regular expression matched (``re.search``) against module
            names; every match is a layer whose output width is the FFN width.
        attribute: the module attribute holding that width (``out_features``
            for ``nn.Linear``, ``nf`` for GPT-2's ``Conv1D``).
    """

    field: str
    producers: str
    attribute: str = "out_features"


_BART_LIKE = (
    FfnField("encoder_ffn_dim", r"(^|\.)encoder\.layers\.\d+\.fc1$"),
    FfnField("decoder_ffn_dim", r"(^|\.)decoder\.layers\.\d+\.fc1$"),
)
_T5_LIKE = (FfnField("d_ff", r"\.DenseReluDense\.wi(_0|_1)?$"),)
_BERT_LIKE = (FfnField("intermediate_size", r"\.intermediate\.dense$"),)
_LLAMA_LIKE = (FfnField("intermediate_size", r"\.mlp\.(gate_proj|up_proj)$"),)

#: Config class name → the FFN width fields it has. A subclass of a listed class
#: uses its entry (the class hierarchy is walked).
FFN_FIELDS: dict[str, tuple[FfnField, ...]] = {
    "OPTConfig": (FfnField("ffn_dim", r"(^|\.)layers\.\d+\.fc1$"),),
    "T5Config": _T5_LIKE,
    "MT5Config": _T5_LIKE,
    "UMT5Config": _T5_LIKE,
    "M2M100Config": _BART_LIKE,
    "BartConfig": _BART_LIKE,
    "MBartConfig": _BART_LIKE,
    "MarianConfig": _BART_LIKE,
    "PegasusConfig": _BART_LIKE,
    "BlenderbotConfig": _BART_LIKE,
    "GPT2Config": (FfnField("n_inner", r"\.mlp\.c_fc$", "nf"),),
    "GPTJConfig": (FfnField("n_inner", r"\.mlp\.fc_in$"),),
    "GPTNeoXConfig": (FfnField("intermediate_size", r"\.mlp\.dense_h_to_4h$"),),
    "BertConfig": _BERT_LIKE,
    "RobertaConfig": _BERT_LIKE,
    "DistilBertConfig": (FfnField("hidden_dim", r"\.ffn\.lin1$"),),
    "ViTConfig": _BERT_LIKE,
    "LlamaConfig": _LLAMA_LIKE,
    "MistralConfig": _LLAMA_LIKE,
    "Qwen2Config": _LLAMA_LIKE,
}


def _model_of(result: Any) -> nn.Module:
    if isinstance(result, nn.Module):
        return result
    model = getattr(result, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise ConfigError(f"expected a MergeResult or an nn.Module, got {type(result).__name__}")


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        raise ConfigError(
            f"{type(model).__name__} has no Hugging Face config (model.config); "
            "use nm.save / nm.load for other models"
        )
    return config


def _fields(config: Any) -> tuple[FfnField, ...]:
    for cls in type(config).__mro__:
        if cls.__name__ in FFN_FIELDS:
            return FFN_FIELDS[cls.__name__]
    known = ", ".join(sorted(FFN_FIELDS))
    raise ConfigError(
        f"no FFN width field is known for {type(config).__name__}; known config classes: "
        f"{known}. Add an entry to neuron_merging.hf.FFN_FIELDS, or save with nm.save"
    )


def ffn_widths(result: Any) -> dict[str, dict[str, int]]:
    """For each FFN width field of the model's config, the width of every FFN layer.

    Returns ``{field: {module name: width}}``. Raises :class:`ConfigError` for a
    config class without a table entry and :class:`ModelError` when an entry
    matches no layer of the model.
    """
    model = _model_of(result)
    config = _config_of(model)
    out: dict[str, dict[str, int]] = {}
    for entry in _fields(config):
        pattern = re.compile(entry.producers)
        widths = {
            name: getattr(module, entry.attribute)
            for name, module in model.named_modules()
            if pattern.search(name) and isinstance(getattr(module, entry.attribute, None), int)
        }
        if not widths:
            raise ModelError(
                f"{type(config).__name__}.{entry.field}: no layer of {type(model).__name__} "
                f"matches {entry.producers!r} (with an int {entry.attribute!r})"
            )
        out.setdefault(entry.field, {}).update(widths)
    return out


def _describe(widths: Mapping[str, int], limit: int = 6) -> str:
    items = [f"{name}: {width}" for name, width in widths.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def update_config(result: Any) -> Any:
    """Set the model's config FFN width field(s) to the compressed width; return the config.

    ``result`` is a :class:`~neuron_merging.MergeResult` or the model. The
    config is changed in place (the result's own copy: :func:`neuron_merging.merge`
    never touches the input model). Every FFN layer a field covers must have
    the same width, else :class:`ConfigError` explains how to keep them uniform.
    """
    model = _model_of(result)
    config = _config_of(model)
    widths = ffn_widths(model)
    new: dict[str, int] = {}
    for field, layers in widths.items():
        distinct = sorted(set(layers.values()))
        if len(distinct) > 1:
            raise ConfigError(
                f"the compressed FFN widths differ between layers ({_describe(layers)}), but "
                f"{type(config).__name__}.{field} holds one width for all layers. Compress "
                "every FFN layer with the same ratio (no per-layer keep= and no exclude= of "
                "FFN layers) so the widths stay uniform, or save with nm.save(result, path), "
                "which records every layer's shape"
            )
        new[field] = distinct[0]
    _check_describes(model, config, new)
    for field, width in new.items():
        setattr(config, field, width)
    return config


def _check_describes(model: nn.Module, config: Any, new: Mapping[str, int]) -> None:
    """Refuse a config that, with ``new`` widths, would not rebuild ``model``'s shapes.

    ``from_pretrained`` builds the model from its config and then loads the weights: a
    layer the config does not describe (a classification head's pooler, compressed to
    another width than ``hidden_size``) fails there with a size mismatch, or with
    ``ignore_mismatched_sizes=True`` is silently re-initialised. The model is rebuilt on
    the meta device (no memory for its tensors) from a copy of the config. A model class
    that cannot be built so from its config is not checked.
    """
    candidate = copy.deepcopy(config)
    for field, width in new.items():
        setattr(candidate, field, width)
    try:
        with torch.device("meta"):
            rebuilt = type(model)(candidate)
    except Exception:  # a class that cannot be built so is not checked
        return
    expected = rebuilt.state_dict()
    differ = [
        f"{key} {tuple(value.shape)} (the config gives {tuple(expected[key].shape)})"
        for key, value in model.state_dict().items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if differ:
        more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
        raise ConfigError(
            f"{type(config).__name__} cannot describe the compressed model: {differ[0]}{more}; "
            "from_pretrained would fail or re-initialise those layers. Exclude them from "
            "compression (exclude=), or save with nm.save(result, path), which records "
            "every layer's shape"
        )


def save_pretrained(result: Any, directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """:func:`update_config`, then ``model.save_pretrained(directory, **kwargs)``.

    The directory then loads with ``from_pretrained`` of the model's class.
    """
    model = _model_of(result)
    update_config(model)
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise ConfigError(f"{type(model).__name__} has no save_pretrained method")
    save(directory, **kwargs)
