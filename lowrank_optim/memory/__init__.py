"""Memory of training with each optimizer: analytical estimate, paper reproduction, measured run.

    python -m lowrank_optim.memory --model 1b --optimizers adamw,galore_adamw,qgalore_adamw8bit \\
        --rank 512 --dtype bf16 --format markdown --plot out.png
    python -m lowrank_optim.memory --model 60m --optimizers adamw,galore_adamw,apollo_adamw,apollo_mini_adamw
    python -m lowrank_optim.memory --model path/to/model --ranks 64,128,256 --plot ranks.png
    python -m lowrank_optim.memory --model path/to/config.json --measure --rank 16
    python -m lowrank_optim.memory --paper          # GaLore paper, Table 2 memory column
    python -m lowrank_optim.memory --measure        # a tiny LLaMA, state bytes from the state

A model is a LLaMA preset, a transformers config, a ``config.json`` or a local model folder
(nothing downloaded; built on the meta device) or an ``nn.Module``; every output carries
the settings it assumes and each optimizer's ratio to AdamW on the same model.

One job per module:

* :mod:`~lowrank_optim.memory.shapes`: the parameters counted (a preset's, a config's, a module's own)
  and which are projected;
* :mod:`~lowrank_optim.memory.estimator`: :func:`estimate`, which adds up what each optimizer
  class and projector declares it keeps (what is counted, and the conventions, are in that
  module's docstring);
* :mod:`~lowrank_optim.memory.paper`: the GaLore paper's memory column against the estimate;
* :mod:`~lowrank_optim.memory.measured`: :func:`state_bytes` of a real optimizer, process
  peaks, a measured run on a small model;
* :mod:`~lowrank_optim.memory.report`: tables with their settings line, the plots, wandb;
* :mod:`~lowrank_optim.memory.cli`: the command line.
"""
from .cli import main
from .estimator import (
    DTYPES,
    FIELDS,
    GB,
    GIB,
    PEER_STATE,
    PEERS,
    MemoryEstimate,
    MemoryRow,
    available_estimators,
    estimate,
)
from .measured import (
    build_optimizer,
    measure,
    model_in_features,
    process_peak_since,
    start_process_peak,
    state_bytes,
    state_bytes_per_param,
    tiny_llama,
)
from .paper import PAPER_TABLE2, paper_table
from .report import (
    log_wandb,
    plot,
    plot_ranks,
    render,
    render_measured,
    render_paper,
    settings_line,
    summary_rows,
)
from .shapes import (
    LLAMA_CONFIGS,
    LLAMA_VOCAB,
    ModelSource,
    ParamSpec,
    llama_param_specs,
    load_config,
    module_param_specs,
    resolve_model,
)

# Every public name of the submodules, importable from the package as it was from the
# single module it replaces.
__all__ = [
    "DTYPES",
    "FIELDS",
    "GB",
    "GIB",
    "LLAMA_CONFIGS",
    "LLAMA_VOCAB",
    "PAPER_TABLE2",
    "PEERS",
    "PEER_STATE",
    "MemoryEstimate",
    "MemoryRow",
    "ModelSource",
    "ParamSpec",
    "available_estimators",
    "build_optimizer",
    "estimate",
    "llama_param_specs",
    "load_config",
    "log_wandb",
    "main",
    "measure",
    "model_in_features",
    "module_param_specs",
    "paper_table",
    "plot",
    "plot_ranks",
    "process_peak_since",
    "render",
    "render_measured",
    "render_paper",
    "resolve_model",
    "settings_line",
    "start_process_peak",
    "state_bytes",
    "state_bytes_per_param",
    "summary_rows",
    "tiny_llama",
]
