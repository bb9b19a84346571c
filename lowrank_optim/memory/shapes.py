"""The parameters the estimator counts, from whatever names the model.

A model is given as a LLaMA preset name (``60m`` ... ``7b``: shapes computed, nothing built),
a ``transformers`` config object, a path to a ``config.json``, a local model folder holding
one (read locally, never downloaded; the model is built on the meta device, so a 70B config
costs no memory), or an ``nn.Module``.  :func:`resolve_model` turns each into a
:class:`ModelSource`, whose :meth:`~ModelSource.specs` lists the trainable tensors.

A :class:`ParamSpec` is one trainable tensor: its name, shape, dtype, whether the optimizer
projects it and whether it is stored as Q-GaLore's INT8 codes.  Which tensors are projected
follows the package's own rule (:func:`lowrank_optim.factory.projectable_weights`): the
matrix of an ``nn.Linear`` or of transformers' ``Conv1D``, and the 3-D stacks of a
fused-experts module (E matrices, each projected on its own), in the modules that
``target_modules`` selects:

* a list or tuple of name fragments: a module is selected when its qualified name contains
  one of them (:func:`lowrank_optim.param_groups`);
* one string: a regular expression the whole module name must match, or ``"all-linear"``
  (the Trainer's ``optim_target_modules`` rule).  A string is one pattern, never a list
  of its characters.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# hidden, intermediate, heads, layers, paper rank
LLAMA_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "60m": (512, 1376, 8, 8, 128),
    "130m": (768, 2048, 12, 12, 256),
    "350m": (1024, 2736, 16, 24, 256),
    "1b": (2048, 5461, 32, 24, 512),
    "7b": (4096, 11008, 32, 32, 1024),
}
LLAMA_VOCAB = 32000

#: The dtype a preset is counted in when none is given: the GaLore paper's (BF16 weights
#: and states); a preset has no module whose dtype could be read.
PRESET_DTYPE = torch.bfloat16

#: What the rank defaults to for a model that is not a preset (capped per model at the
#: smallest projected matrix, so that every projected matrix accepts it).
DEFAULT_RANK = 128

@dataclass
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    projected: bool
    int8: bool = False  # Q-GaLore INT8 weight: 1-byte codes + fp32 scale and uint8 zero per 256
    dtype: torch.dtype | None = None  # None: the estimate's dtype (a preset has no module to ask)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrices(self) -> int:
        """Matrices the optimizer projects in this tensor: E for a fused-experts stack."""
        if not self.projected:
            return 0
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The shape of one projected matrix (of a stack: one expert's)."""
        return self.shape[1:] if self.projected and len(self.shape) == 3 else self.shape


def target_selector(target_modules: str | Iterable[str]) -> Callable[[str], bool]:
    """Which module names ``target_modules`` selects (module docstring): fragments of a
    list as :func:`lowrank_optim.param_groups`, one string as the Trainer's rule."""
    if isinstance(target_modules, str):
        from ..integrations.transformers import _matches

        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a regular expression ({err})") from None
        return lambda name: _matches(target_modules, name)
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules={targets!r} must be name fragments, one regex or 'all-linear'")
    return lambda name: any(t in name for t in targets)


def describe_targets(target_modules: str | Iterable[str]) -> str:
    if isinstance(target_modules, str):
        return target_modules if target_modules.replace("_", "-") == "all-linear" else f"regex {target_modules}"
    return ",".join(target_modules)


def llama_param_specs(model: str, tied: bool = False, target_modules: str | Iterable[str] = ("attn", "mlp"),
                      vocab: int = LLAMA_VOCAB) -> list[ParamSpec]:
    """The parameter shapes of a LLaMA config (names as in ``transformers``' LlamaForCausalLM),
    computed from the config, nothing instantiated."""
    key = model.lower()
    if key not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model {model!r}; valid ones: {', '.join(LLAMA_CONFIGS)} (or pass an nn.Module)")
    h, i, _, layers, _ = LLAMA_CONFIGS[key]
    selected = target_selector(target_modules)
    specs = [ParamSpec("model.embed_tokens.weight", (vocab, h), False)]
    for layer in range(layers):
        pre = f"model.layers.{layer}"
        for proj, shape in (("q_proj", (h, h)), ("k_proj", (h, h)), ("v_proj", (h, h)), ("o_proj", (h, h))):
            name = f"{pre}.self_attn.{proj}"
            specs.append(ParamSpec(name + ".weight", shape, selected(name)))
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            name = f"{pre}.mlp.{proj}"
            specs.append(ParamSpec(name + ".weight", shape, selected(name)))
        specs += [ParamSpec(f"{pre}.input_layernorm.weight", (h,), False),
                  ParamSpec(f"{pre}.post_attention_layernorm.weight", (h,), False)]
    specs.append(ParamSpec("model.norm.weight", (h,), False))
    if not tied:
        specs.append(ParamSpec("lm_head.weight", (vocab, h), selected("lm_head")))
    return specs


def projected_ids(model: nn.Module, target_modules: str | Iterable[str] = ("attn", "mlp")) -> set[int]:
    """``id`` of every tensor of ``model`` a projected group takes (module docstring)."""
    from ..factory import projectable_weights

    selected = target_selector(target_modules)
    return {id(w) for name, module in model.named_modules() if selected(name) for w in projectable_weights(module)}


def module_param_specs(model: nn.Module, target_modules: str | Iterable[str] = ("attn", "mlp")) -> list[ParamSpec]:
    """Shapes and dtypes of a module's trainable parameters (tied ones once; the meta device
    is fine) and which are projected, by the package's rule (module docstring)."""
    from ..quant import Int8Linear

    projected = projected_ids(model, target_modules)
    # An INT8 weight's codes are uint8; its gradient and state are in the layer's compute dtype.
    int8 = {id(m.weight): m.compute_dtype for m in model.modules() if isinstance(m, Int8Linear)}
    specs, seen = [], set()
    for name, p in model.named_parameters():
        if (not p.requires_grad and id(p) not in int8) or id(p) in seen:
            continue
        seen.add(id(p))
        specs.append(ParamSpec(name, tuple(p.shape), id(p) in projected, id(p) in int8, int8.get(id(p), p.dtype)))
    return specs


# ----------------------------------------------------------------------------- model sources
def _config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config asks for (``dtype``; ``torch_dtype`` before transformers 4.56)."""
    value = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def _is_config(obj: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(obj, PretrainedConfig)


#: What transformers raises for a config it cannot read or build a model from: a malformed
#: file, an unknown model_type, a model that needs a package this machine lacks.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def load_config(path: str | os.PathLike) -> Any:
    """The transformers config in a ``config.json`` file or a local model folder; nothing is
    downloaded (``local_files_only``)."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{str(path)!r}: folder without a config.json")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except _LOAD_ERRORS as err:  # a JSON error, an unknown model_type: name the file, not its contents
        raise ValueError(f"{str(file)!r} is not a transformers config ({_first_line(err)})") from None


def build_from_config(config: Any, label: str, meta: bool = True) -> nn.Module:
    """The causal-LM model of ``config`` (or the bare model for a config that has none),
    on the meta device unless ``meta=False`` (randomly initialised, for a measured run)."""
    from transformers import AutoModel, AutoModelForCausalLM

    errors = []
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            if meta:
                with torch.device("meta"):
                    return auto.from_config(config)
            return auto.from_config(config)
        except _LOAD_ERRORS as err:  # ValueError for a config the class has no model for
            errors.append(_first_line(err))
    raise ValueError(f"cannot build a model from {label} ({errors[-1]})")


@dataclass
class ModelSource:
    """A model as the estimator sees it: what to call it, where its shapes come from and,
    when no dtype is given, which dtype to count in and why."""

    label: str
    kind: str  # "LLaMA preset", "transformers config", "config.json", "model folder", "nn.Module"
    preset: str | None = None
    module: nn.Module | None = None  # for configs: built on the meta device
    config: Any = None
    dtype_note: str = ""

    def specs(self, target_modules: str | Iterable[str] = ("attn", "mlp"), tied: bool = False) -> list[ParamSpec]:
        if self.preset is not None:
            return llama_param_specs(self.preset, tied, target_modules)
        if tied:
            raise ValueError(f"tied=True applies to a LLaMA preset; {self.label} ties its embeddings by its own config")
        return module_param_specs(self.module, target_modules)

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, tied: bool = False,
              ) -> nn.Module:
        """A real model with these shapes (random weights: state bytes do not depend on
        their values), for a measured run."""
        if self.preset is not None:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(llama_config(self.preset, tied))
            return model.to(device=device, dtype=dtype or PRESET_DTYPE)
        if self.config is not None:
            model = build_from_config(self.config, self.label, meta=False)
        else:
            model = self.module
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def llama_config(preset: str, tied: bool = False) -> Any:
    """The ``transformers.LlamaConfig`` of a preset (vocabulary 32000, untied unless ``tied``)."""
    from transformers import LlamaConfig

    h, i, heads, layers, _ = LLAMA_CONFIGS[preset]
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=heads,
                       num_hidden_layers=layers, vocab_size=LLAMA_VOCAB, tie_word_embeddings=tied)


def _from_config(config: Any, label: str, kind: str) -> ModelSource:
    dtype = _config_dtype(config)
    note = "the config's dtype" if dtype is not None else "the config sets none: from_config builds float32"
    return ModelSource(label, kind, module=build_from_config(config, label), config=config, dtype_note=note)


def resolve_model(model: Any) -> ModelSource:
    """``model`` as a :class:`ModelSource`: a LLaMA preset name, a transformers config, a
    path to a ``config.json`` or to a local model folder, or an ``nn.Module``."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, nn.Module):
        return ModelSource(type(model).__name__, "nn.Module", module=model, dtype_note="the module's own")
    if _is_config(model):
        name = getattr(model, "name_or_path", "") or getattr(model, "_name_or_path", "")
        label = f"{type(model).__name__}" + (f" ({name})" if name else "")
        return _from_config(model, label, "transformers config")
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if isinstance(model, str) and text.lower() in LLAMA_CONFIGS:
            return ModelSource(text.lower(), "LLaMA preset", preset=text.lower(),
                               dtype_note="the GaLore paper's, for a preset")
        path = Path(text).expanduser()
        if path.exists():
            kind = "model folder" if path.is_dir() else "config.json"
            return _from_config(load_config(path), str(model), kind)
        raise ValueError(f"unknown model {text!r}: not a LLaMA preset ({', '.join(LLAMA_CONFIGS)}) nor an existing "
                         "config.json or model folder (nothing is downloaded: pass a local path)")
    raise ValueError(f"model must be a LLaMA preset name ({', '.join(LLAMA_CONFIGS)}), a transformers config, "
                     f"a config.json path, a model folder or an nn.Module, not a {type(model).__name__}")
