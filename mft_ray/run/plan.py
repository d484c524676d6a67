"""The resource plan of a config: what each society and each finetune asks of the cluster, an estimate of a
finetune's memory per GPU, and the problems that would make the run fail (``problems``). The driver's
preflight (``mft_ray.run.preflight.check_config``) refuses those before any work; ``mft plan`` prints the
plan for a described cluster. Pure: no Ray, no model is loaded.

Memory of one finetune worker, in GiB (P parameters, W = ``finetune.num_workers`` data-parallel ranks,
w = 2 bytes with bf16 else 4; ZeRO partitions as DeepSpeed does: stage 1 the optimizer states, stage 2 also
the gradients, stage 3 also the weights)::

    weights      P * w         / (W if zero_stage == 3 else 1)
    gradients    P * w         / (W if zero_stage >= 2 else 1)
    AdamW        P * (4 + 8)   / (W if zero_stage >= 1 else 1)   fp32 master copy + 2 fp32 moments
                                                                 (P * 8 in fp32: the weights are the master)
    activations  b * s * h * w * (L + 17)   with gradient checkpointing (each layer's input + one layer's
                 b * s * h * w * 17 * L     without                      recompute), Korthikanti et al. 2022
                 + b * s * V * (w + 8)      the logits, their fp32 copy for the loss and its gradient
    buffers      2 GiB on a GPU (CUDA context, NCCL, allocator slack) + ZeRO's gather and reduce buckets at
                 DeepSpeed's defaults: min(P, 1e9 with ZeRO-3 else 5e8) * w + min(P, 5e8) * w (stages >= 1)

With ``finetune.adapter: lora`` only the adapters' T parameters train: gradients and AdamW are those terms with
T for P, the frozen weights stay P * w, and T = L * sum over target modules of r * (in + out), with in + out
= 2h for attention projections and 5h for MLP ones (an upper bound for Llama's widths, GQA and MLP ratio).

b, s: the largest micro-batch (``finetune.<role>.batch_size``) and ``max_length`` of the trained roles;
h, L, V: hidden size, layers and vocabulary. A worker with a fraction g < 1 of a GPU shares it with 1/g
workers. P and the shape come from the model's ``config.json`` when ``model.path`` is a local checkpoint
(or a cached built-in model), else from ``model.num_parameters`` with a Llama-like shape assumed
(L = h / 128, P ~ 12 L h^2, V = 128256); without either the memory is unknown and not checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_ray.config import BUILTIN_PREFIX, Config
from mft_ray.errors import ConfigError, MftError
from mft_ray.methods.registry import get_method, method_config, train_units
from mft_ray.models.builtin import BUILTIN_MODELS, builtin_model_dir
from mft_ray.society.members import CRITIC, SUMMARIZER, plan_engines, society_members
from mft_ray.training.slots import lanes_at_once, lone_worker_cpus, memory_slots
from mft_ray.training.spec import FinetuneJob

GIB = 2**30
ASSUMED_VOCAB = 128256  # Llama-3's, for a model known only by its parameter count
BASE = "base"


@dataclass(frozen=True)
class ClusterSpec:
    """A described cluster of identical nodes (default: one node of 8 x 80 GiB GPUs and 96 CPUs)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    cpus_per_node: float = 96.0
    memory_gb_per_node: float | None = None  # Ray's "memory" of each node (host RAM less the object store)

    def __post_init__(self) -> None:
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_node", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if not self.gpu_memory_gb > 0:
            raise ConfigError(f"--gpu-memory-gb must be > 0, got {self.gpu_memory_gb}")
        if self.memory_gb_per_node is not None and not self.memory_gb_per_node > 0:
            raise ConfigError(f"--memory-gb-per-node must be > 0, got {self.memory_gb_per_node}")

    def describe(self) -> str:
        memory = "" if self.memory_gb_per_node is None else f", {self.memory_gb_per_node:g} GiB of memory"
        return (f"{self.nodes} node(s) x {self.gpus_per_node} GPUs ({self.gpu_memory_gb:g} GiB each), "
                f"{self.cpus_per_node:g} CPUs{memory}")


@dataclass(frozen=True)
class ModelShape:
    """Parameter count (not billions) and, when known or assumed, the shape the activations need."""

    parameters: float
    hidden: int
    layers: int
    vocab: int
    source: str  # where the numbers come from, for the printout


@dataclass(frozen=True)
class SocietyPlan:
    """One kind of society (the base model at iteration 0, or the finetuned ones) and what it asks."""

    kind: str
    members: int
    engines: int
    gpus_per_engine: float
    cpus_per_engine: float
    fits: bool | None = None  # on the described cluster; None = no cluster given

    @property
    def gpus(self) -> float:
        return self.engines * self.gpus_per_engine

    @property
    def cpus(self) -> float:
        return self.engines * self.cpus_per_engine


@dataclass(frozen=True)
class FinetunePlan:
    """The finetunes of one iteration: each a Ray Train worker group of ``workers`` workers."""

    units: int
    iterations: int
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    zero_stage: int
    bf16: bool
    gradient_checkpointing: bool
    micro_batch: int
    max_length: int
    memory_gb: dict[str, float] | None  # per GPU (per worker on CPU): the formula's terms and "total"
    at_once: int | None = None  # finetunes whose worker groups fit on the described cluster together
    # A LoRA society's adapters trained together (finetune.adapters_together): one Ray Train run per iteration.
    together: bool = False
    # The CPUs of each worker of a run that trains alone on the described cluster (the adapters' one run, or
    # the one lane of separate finetunes): a lone CPU worker takes those the lanes would use, any other run
    # finetune.cpus_per_worker. None: several lanes, no cluster described, or nothing fits.
    worker_cpus: float | None = None


@dataclass
class ResourcePlan:
    """The whole plan; ``problems`` are refusals (the run would fail), ``notes`` are for information."""

    model: str
    shape: ModelShape | None
    cluster: ClusterSpec | None
    societies: list[SocietyPlan]
    finetune: FinetunePlan | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for row, society in zip(out["societies"], self.societies):
            row.update(gpus=society.gpus, cpus=society.cpus)
        return out

    def format(self) -> str:
        """The plan as lines for a terminal."""
        s = self.shape
        lines = [f"cluster: {self.cluster.describe() if self.cluster else 'not described'}",
                 f"model: {self.model}, " + (f"{_count(s.parameters)} parameters ({s.source})" if s else
                                              "parameter count unknown")]
        for p in self.societies:
            fit = "" if p.fits is None else ("  fits" if p.fits else "  DOES NOT FIT")
            lines.append(f"society, {p.kind}: {p.members} members on {p.engines} engine(s) x (GPU "
                         f"{p.gpus_per_engine:g}, CPU {p.cpus_per_engine:g}) = GPU {p.gpus:g}, CPU {p.cpus:g}{fit}")
        f = self.finetune
        if f is None:
            lines.append("finetunes: none")
        else:
            what = (f"finetunes: {f.units} LoRA adapters per iteration x {f.iterations} iteration(s), trained "
                    f"together in one run of" if f.together else
                    f"finetunes: {f.units} per iteration x {f.iterations} iteration(s), each")
            lines.append(f"{what} {f.workers} "
                         f"worker(s) x (GPU {f.gpus_per_worker:g}, CPU {f.cpus_per_worker:g}) = GPU "
                         f"{f.workers * f.gpus_per_worker:g}, CPU {f.workers * f.cpus_per_worker:g}; "
                         f"ZeRO-{f.zero_stage}, {'bf16' if f.bf16 else 'fp32'}, gradient checkpointing "
                         f"{'on' if f.gradient_checkpointing else 'off'}, micro-batch {f.micro_batch} x "
                         f"{f.max_length} tokens")
            where = "per GPU" if f.gpus_per_worker > 0 else "per worker (host memory)"
            m = f.memory_gb
            lines.append(f"  memory {where}, estimated: " + ("unknown (set model.num_parameters)" if m is None else
                         f"{m['total']:.1f} GiB = " + " + ".join(f"{k} {v:.1f}" for k, v in m.items() if k != "total")))
            wide = f.worker_cpus is not None and f.worker_cpus != f.cpus_per_worker
            if f.together:
                if wide:
                    lines.append(f"  its CPU worker takes {f.worker_cpus:g} CPUs on the cluster: those of the lanes "
                                 "separate finetunes would use, free on one node (more torch threads)")
            elif f.at_once is not None:
                per_lane = math.ceil(f.units / f.at_once) if f.at_once else 0
                lines.append(f"  at once on the cluster: {f.at_once} of {f.units}" +
                             (f" ({min(f.at_once, f.units)} lane(s), ~{per_lane} finetune(s) each one after "
                              "another, per iteration)" if f.at_once else ""))
                if wide:
                    lines.append(f"  one lane: its CPU worker takes {f.worker_cpus:g} CPUs on the cluster, those the "
                                 "other lanes would use, free on one node (more torch threads)")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["problems: none"]
        return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_shape(config: Config) -> ModelShape | None:
    """P and the shape from a local (or cached built-in) checkpoint's config.json, else from
    ``model.num_parameters`` with an assumed Llama-like shape, else None."""
    path = config.model.path
    if config.model.engine != "openai":
        local: Path | None = Path(path).expanduser()
        if path.startswith(BUILTIN_PREFIX):
            name = path[len(BUILTIN_PREFIX):]
            try:  # cached or not, nothing is built here; a missing source package means "unknown"
                local = builtin_model_dir(name) if name in BUILTIN_MODELS else None
            except (MftError, OSError):
                local = None
        shape = _shape_from_config_json(local / "config.json") if local is not None else None
        if shape is not None:
            return shape
    if config.model.num_parameters is None:
        return None
    p = float(round(config.model.num_parameters * 1e9))
    hidden = max(128, round((p * 128 / 12) ** (1 / 3) / 128) * 128)
    return ModelShape(p, hidden, hidden // 128, ASSUMED_VOCAB,
                      f"model.num_parameters; shape assumed: hidden {hidden}, {hidden // 128} layers, "
                      f"vocabulary {ASSUMED_VOCAB}")


def checkpoint_shape(path: str | os.PathLike) -> ModelShape | None:
    """The shape of the local Hugging Face checkpoint in ``path`` (its config.json); None if unreadable."""
    return _shape_from_config_json(Path(path) / "config.json")


def job_memory_gb(job: FinetuneJob, workers: int) -> float | None:
    """The module docstring's estimate for one CPU worker of ``job`` (host memory, GiB), from its spec and its
    checkpoint's shape; None when the shape is unknown. An upper bound: batches are padded to their longest
    example, which may be shorter than ``max_length``."""
    shape = checkpoint_shape(job.init_path)
    if shape is None:
        return None
    s = job.spec
    trainable = lora_parameters(shape, s.lora.rank, list(s.lora.target_modules)) if s.lora is not None else None
    return finetune_memory_gb(shape, workers, s.zero_stage, s.bf16, s.gradient_checkpointing, s.batch_size,
                              s.max_length, gpu=False, trainable=trainable)["total"]


def _shape_from_config_json(path: Path) -> ModelShape | None:
    """Llama-style count: embeddings (+ an untied LM head), per layer attention with grouped KV heads, a
    gated MLP (3 matrices) and two norms, and the final norm. None if the file is missing or unusual."""
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
        c = c.get("text_config", c)
        h, layers, inter, vocab = (int(c[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                       "vocab_size"))
        heads = int(c.get("num_attention_heads") or max(1, h // 128))
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or h // heads)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    per_layer = attention + 3 * h * inter + 2 * h
    head = 0 if c.get("tie_word_embeddings", False) else vocab * h
    return ModelShape(float(layers * per_layer + h + vocab * h + head), h, layers, vocab,
                      f"config.json of {path.parent}")


MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp")


def lora_parameters(shape: ModelShape, rank: int, target_modules: list[str]) -> float:
    """T, the trainable parameters of one agent's LoRA adapter (module docstring)."""
    widths = sum((5 if any(k in name for k in MLP_MODULES) else 2) * shape.hidden for name in target_modules)
    return float(shape.layers * rank * widths)


def finetune_memory_gb(shape: ModelShape, workers: int, zero_stage: int, bf16: bool, checkpointing: bool,
                       micro_batch: int, max_length: int, gpu: bool = True,
                       trainable: float | None = None) -> dict[str, float]:
    """The module docstring's formula for one worker, in GiB: each term and ``total``. ``trainable``: the
    parameters that train (a LoRA adapter's T; default every parameter)."""
    p, w = shape.parameters, 2 if bf16 else 4
    t = p if trainable is None else trainable
    tokens = micro_batch * max_length
    per_layer = shape.hidden * w * 17
    terms = {
        "weights": p * w / (workers if zero_stage == 3 else 1),
        "gradients": t * w / (workers if zero_stage >= 2 else 1),
        "AdamW": t * (12 if bf16 else 8) / (workers if zero_stage >= 1 else 1),
        "activations": tokens * (shape.hidden * w * shape.layers + per_layer if checkpointing else
                                 per_layer * shape.layers) + tokens * shape.vocab * (w + 8),
        "buffers": 2 * GIB * gpu + (min(p, 1e9 if zero_stage == 3 else 5e8) * w + min(t, 5e8) * w if zero_stage
                                    else 0),
    }
    out = {k: v / GIB for k, v in terms.items()}
    out["total"] = sum(out.values())
    return out


def _packs(bundles: list[tuple[float, float]], cluster: ClusterSpec, strategy: str = "PACK") -> bool:
    """Whether (CPU, GPU) bundles fit on the cluster's nodes (first fit, largest first)."""
    if strategy == "STRICT_SPREAD" and len(bundles) > cluster.nodes:
        return False
    nodes = [[cluster.cpus_per_node, float(cluster.gpus_per_node)] for _ in range(
        1 if strategy == "STRICT_PACK" else cluster.nodes)]
    for cpu, gpu in sorted(bundles, key=lambda b: (b[1], b[0]), reverse=True):
        node = next((n for n in nodes if n[0] + 1e-9 >= cpu and n[1] + 1e-9 >= gpu), None)
        if node is None:
            return False
        node[0] -= cpu
        node[1] -= gpu
        if strategy == "STRICT_SPREAD":
            nodes.remove(node)
    return True


def _societies(config: Config) -> tuple[list[SocietyPlan], int]:
    """Iteration 0 and the finetuned societies (the larger of the evaluation and data debates'), and the
    number of train units per iteration."""
    method, res = get_method(config.method), config.resources
    units = train_units(method, config.debate.agents)
    unit_of = {m: u.name for u in units for m in u.members}
    plans: dict[str, SocietyPlan] = {}
    for kind in ("iteration 0 (base model)", "finetuned (iterations >= 1)"):
        for stage in ("evaluate", "collect"):
            debate = method_config(config, stage).debate
            members = society_members(debate.agents, debate.summarize)
            # A LoRA society's finetuned members are adapters of the base: with shared engines, one engine.
            base_only = kind.startswith("iteration 0") or config.finetune.adapter == "lora"
            paths = {m: BASE if base_only or m.role == SUMMARIZER else unit_of.get(m, BASE) for m in members}
            engines = len(plan_engines(members, paths, res.share_engine))
            if kind not in plans or engines > plans[kind].engines:
                plans[kind] = SocietyPlan(kind, len(members), engines, res.num_gpus_per_agent, res.num_cpus_per_agent)
    iterations = method_config(config).finetune.iterations
    return [plans[k] for k in plans if iterations > 0 or k.startswith("iteration 0")], len(units) if iterations else 0


def resource_plan(config: Config, cluster: ClusterSpec | None = None) -> ResourcePlan:
    """The plan of ``config``; with ``cluster``, also whether each part fits it and how many finetunes run at
    once. Problems that need no cluster: inference on GPUs with finetunes on CPU, a finetune (or a vLLM
    engine's weights) over the GPU memory (the cluster's, else ``resources.gpu_memory_gb``)."""
    ft, res, model = config.finetune, config.resources, config.model
    gpu_gb, gpu_label = ((cluster.gpu_memory_gb, f"the cluster's {cluster.gpu_memory_gb:g} GiB GPUs") if cluster
                         else (res.gpu_memory_gb, f"resources.gpu_memory_gb={res.gpu_memory_gb:g}"))
    shape = model_shape(config)
    societies, units = _societies(config)
    plan = ResourcePlan(f"{model.path} (engine {model.engine})", shape, cluster, societies, None)
    if cluster is not None:
        plan.societies = [dataclasses.replace(s, fits=_packs([(s.cpus_per_engine, s.gpus_per_engine)] * s.engines,
                                                             cluster, res.placement_strategy)) for s in societies]
        for s in plan.societies:
            if not s.fits:
                plan.problems.append(f"the {s.kind} society needs {s.engines} engine(s) of GPU {s.gpus_per_engine:g}, "
                                     f"CPU {s.cpus_per_engine:g} (GPU {s.gpus:g}, CPU {s.cpus:g} in all, strategy "
                                     f"{res.placement_strategy}), more than {cluster.describe()} hold; lower "
                                     "resources.num_*_per_agent or enable resources.share_engine")
    g = res.num_gpus_per_agent
    if model.engine == "vllm" and g > 0:
        per_gpu = max(1, math.floor(1 / g + 1e-9)) if g < 1 else 1
        if per_gpu * model.gpu_memory_utilization > 1 + 1e-9:
            plan.problems.append(f"resources.num_gpus_per_agent={g:g} puts {per_gpu} vLLM engines on one GPU, each "
                                 f"reserving model.gpu_memory_utilization={model.gpu_memory_utilization:g} of it; "
                                 f"lower it to <= {1 / per_gpu:.2f}")
        if shape is not None:
            weights = shape.parameters * 2 / model.tensor_parallel_size / GIB
            reserved = model.gpu_memory_utilization * gpu_gb
            plan.notes.append(f"inference: {weights:.1f} GiB of 16-bit weights per engine; vLLM reserves "
                              f"{reserved:.1f} GiB for each (model.gpu_memory_utilization "
                              f"{model.gpu_memory_utilization:g} of {gpu_gb:g} GiB), {per_gpu} engine(s) per GPU")
            if weights >= reserved:
                plan.problems.append(f"a vLLM engine's {weights:.1f} GiB of weights do not fit in the "
                                     f"{reserved:.1f} GiB it reserves (model.gpu_memory_utilization="
                                     f"{model.gpu_memory_utilization:g} of {gpu_label}); raise it or "
                                     "resources.num_gpus_per_agent")
    if config.metrics.nll_problems > 0:
        plan.notes.append("each evaluation also loads up to two engines alone for the critic and base NLL "
                          "(metrics.nll_problems > 0), once the society is released")
    if units == 0:
        return plan
    method = get_method(config.method)
    roles = [ft.generator] if method.shared_model or CRITIC not in method.trained_roles else [ft.generator, ft.critic]
    bf16 = ft.bf16 if ft.bf16 is not None else ft.gpus_per_worker > 0
    batch, length = max(r.batch_size for r in roles), max(r.max_length for r in roles)
    together = ft.adapter == "lora" and ft.adapters_together and units > 1
    memory = None
    if shape is not None:
        trainable = lora_parameters(shape, ft.lora.rank, ft.lora.target_modules) if ft.adapter == "lora" else None
        if together and trainable is not None:  # every adapter's states in the one worker (an upper bound)
            trainable *= units
        memory = finetune_memory_gb(shape, ft.num_workers, ft.zero_stage, bf16, ft.gradient_checkpointing, batch,
                                    length, gpu=ft.gpus_per_worker > 0, trainable=trainable)
        if 0 < ft.gpus_per_worker < 1:  # several workers share each GPU
            memory = {k: v / ft.gpus_per_worker for k, v in memory.items()}
    at_once = worker_cpus = None
    if cluster is not None:
        group = [(ft.cpus_per_worker, ft.gpus_per_worker)] * ft.num_workers
        at_once = next((k - 1 for k in range(1, units + 1) if not _packs(group * k, cluster)), units)
        if (not together and at_once and ft.gpus_per_worker == 0 and memory is not None
                and cluster.memory_gb_per_node is not None):  # as actors.finetune caps CPU lanes
            at_once = min(at_once, memory_slots(ft.num_workers, memory["total"],
                                                [cluster.memory_gb_per_node] * cluster.nodes))
        # As actors.finetune.run_finetunes sizes a run that trains alone on an idle cluster: a lone CPU worker of
        # the adapters' one run takes the CPUs of the lanes separate finetunes would use; of a single lane, those
        # of every lane.
        if together and at_once or (not together and at_once == 1):
            total = {"CPU": cluster.nodes * cluster.cpus_per_node, "GPU": cluster.nodes * cluster.gpus_per_node}
            lanes = lanes_at_once(ft.num_workers, ft.cpus_per_worker, ft.gpus_per_worker, total, ft.max_concurrent)
            worker_cpus = lone_worker_cpus(ft.num_workers, ft.cpus_per_worker, ft.gpus_per_worker,
                                           min(lanes, units) if together else lanes,
                                           lambda _: [cluster.cpus_per_node] * cluster.nodes)
        if together and at_once:
            at_once = 1
        if at_once == 0:
            plan.problems.append(f"a finetune needs {ft.num_workers} worker(s) of GPU {ft.gpus_per_worker:g}, CPU "
                                 f"{ft.cpus_per_worker:g}, more than {cluster.describe()} hold; lower "
                                 "finetune.num_workers, finetune.cpus_per_worker or finetune.gpus_per_worker")
    plan.finetune = FinetunePlan(units, method_config(config).finetune.iterations, ft.num_workers,
                                 ft.cpus_per_worker, ft.gpus_per_worker, ft.zero_stage, bf16,
                                 ft.gradient_checkpointing, batch, length, memory, at_once, together, worker_cpus)
    if g > 0 and ft.gpus_per_worker == 0:
        plan.problems.append(f"resources.num_gpus_per_agent={g:g} runs inference on GPUs but "
                             f"finetune.gpus_per_worker=0 would train each of the {units} finetunes per iteration on "
                             f"CPU ({ft.num_workers} worker(s), {'bf16' if bf16 else 'fp32'}); set "
                             "finetune.gpus_per_worker (e.g. 1) and finetune.num_workers, or finetune.iterations=0")
    if memory is None:
        plan.notes.append("finetune memory not estimated: model.path is neither a local checkpoint nor a built "
                          "built-in model; set model.num_parameters (billions)")
    elif ft.gpus_per_worker > 0 and memory["total"] > gpu_gb:
        plan.problems.append(f"a finetune needs an estimated {memory['total']:.1f} GiB per GPU (ZeRO-{ft.zero_stage} "
                             f"over {ft.num_workers} worker(s), {'bf16' if bf16 else 'fp32'}, micro-batch {batch} x "
                             f"{length} tokens), more than {gpu_label}; raise finetune.num_workers with "
                             "finetune.zero_stage=3, set finetune.gradient_checkpointing=true or lower "
                             "finetune.*.max_length")
    return plan
