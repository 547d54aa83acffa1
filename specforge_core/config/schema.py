"""Typed core config sections (attrs). Plugins add their own tables under these sections.

The TOML layout is one table per section (``[model]``, ``[dataset]``, ...). A component's own
options live in ``[<section>.<component-name>]`` (e.g. ``[inference.sglang]``), typed by the attrs
class the plugin registered; see ``specforge_core.components.KINDS``.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from specforge_core.config.fields import in_range, non_negative, option, positive

DTYPES = ("auto", "bf16", "fp16", "fp32")
# Component selectors (``components.KINDS``) default to empty: the loader fills in the component a
# plugin declares the default of its kind (``hookspecs.register_defaults``), so no core default
# names a plugin's component.
SELECTOR_DEFAULT = "empty = the default a plugin declares; `specforge plugins` lists the installed ones"


@attrs.define
class RunSection:
    name: str = option("specforge", "Run name; keys in transfer stores and W&B runs carry it")
    output_dir: str = option("runs/{name}", "Where checkpoints and exports go; {name} is replaced", path=True)
    seed: int = option(0, "Seed for data order and weight initialisation")
    pipeline: str = option(
        "local", "How stages are placed: 'local' (one process) or 'ray' (disaggregated actors)",
        choices=("local", "ray"),
    )
    ray_address: str = option(
        "",
        "Ray pipeline: cluster to join ('auto' = the one `ray start` made on this node, or "
        "'ray://host:port'); empty = $RAY_ADDRESS if set, else start a local one-node cluster",
    )
    # Hardware the run is planned for: used by `specforge plan` and `config validate` (placement,
    # memory fit); 0 = unknown, those checks are skipped.
    nodes: int = option(1, "Nodes the run spans (for planning and validation)", validator=positive)
    gpus_per_node: int = option(0, "GPUs on each node (0 = unknown: placement checks are skipped)", validator=non_negative)
    gpu_memory_gib: float = option(
        0.0, "Memory of one GPU in GiB, e.g. 80 (H100) or 141 (H200); 0 = unknown: memory checks are skipped",
        validator=non_negative,
    )


@attrs.define
class ModelSection:
    target: str = option("", "Target model: a local directory or a hub id (e.g. 'Qwen/Qwen3-8B')",
                         path="path-or-hub-id")
    draft: str = option("", f"Draft algorithm ({SELECTOR_DEFAULT})")
    aux_layers: list[int] = option(
        factory=list,
        help="Target layers whose input residual stream is captured (HF hidden_states indices); "
        "empty = the draft algorithm's own default for the target (EAGLE-3: 2, L//2, L-3)",
    )
    draft_vocab_size: int = option(32000, "Draft vocabulary size (most frequent target tokens)", validator=positive)
    vocab_mapping: Optional[str] = option(
        None, "Existing vocab mapping (.safetensors with d2t/t2d) to reuse instead of computing one", path=True
    )
    trust_remote_code: bool = option(False, "Pass trust_remote_code to transformers")
    target_config: str = option(
        "", "Local copy of the target's config.json (file or directory) used by `config validate` and "
        "`specforge plan` when model.target is a hub id; empty = read model.target's own", path=True
    )


@attrs.define
class DatasetSection:
    path: list[str] = option(factory=list, help="JSONL/JSON conversation files (ShareGPT or OpenAI style)",
                              path=True)
    format: str = option("auto", "Conversation format", choices=("auto", "sharegpt", "openai"))
    chat_template: str = option(
        "auto", "'auto' = the target tokenizer's own template, or a named one",
        choices=("auto", "llama3", "chatml", "qwen", "qwen3", "gemma"),
    )
    reasoning: str = option(
        "keep", "Assistant reasoning (reasoning_content / thinking / <think> blocks): 'keep' renders it as "
        "the chat template does and trains on it, 'drop' removes it (docs/data.md)", choices=("keep", "drop"),
    )
    max_seq_length: int = option(2048, "Longer conversations are truncated to this many tokens", validator=positive)
    on_error: str = option("skip", "Malformed lines: 'skip' (counted) or 'stop'", choices=("skip", "stop"))
    cache_dir: str = option(".cache/specforge", "Tokenized-data cache (keyed by data, tokenizer, settings)",
                            path=True)
    max_samples: Optional[int] = option(None, "Use at most this many samples", validator=positive)
    shuffle: bool = option(True, "Shuffle sample order each epoch (seeded)")


@attrs.define
class TrainingSection:
    strategy: str = option("", f"Training strategy ({SELECTOR_DEFAULT})")
    loss: str = option("", f"Loss ({SELECTOR_DEFAULT})")
    scheduler: str = option("", f"LR schedule ({SELECTOR_DEFAULT})")
    num_gpus: int = option(1, "Trainer processes (GPUs; CPU processes on a machine without GPU)", validator=positive)
    num_epochs: int = option(1, "Passes over the dataset", validator=positive)
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = from num_epochs)", validator=non_negative)
    micro_batch_size: int = option(1, "Samples per trainer per micro-step", validator=positive)
    pack_tokens: int = option(
        0, "Pack each micro-batch's samples end to end into rows of this many tokens (attention and targets "
        "stay inside each sample; one shape every step, no padding between samples). 0 = pad every sample to "
        "the micro-batch's longest. Must be >= dataset.max_seq_length", validator=non_negative,
    )
    token_budget: bool = option(
        False, "Token-budget steps (needs pack_tokens): every optimizer step is gradient_accumulation "
        "micro-batches of micro_batch_size rows of pack_tokens positions, filled from the shuffled sample "
        "stream (samples that waited first, then the longest); a sample that does not fit waits for the next "
        "step. The same shape and nearly the same tokens every step (ShareGPT in rows of 8192: 97% full); "
        "with num_gpus ranks a step has num_gpus times the rows",
    )
    gradient_accumulation: int = option(1, "Micro-steps per optimizer step", validator=positive)
    lr: float = option(1e-4, "Peak learning rate", validator=in_range(0, None, lo_open=True))
    betas: list[float] = option(factory=lambda: [0.9, 0.95], help="AdamW betas")
    weight_decay: float = option(0.0, "AdamW weight decay", validator=non_negative)
    max_grad_norm: float = option(0.5, "Gradient clipping norm (0 = off)", validator=non_negative)
    warmup_ratio: float = option(0.02, "Fraction of steps spent in linear warmup", validator=in_range(0, 1))
    dtype: str = option("auto", "'auto' = bf16 on GPU, fp32 on CPU", choices=DTYPES)
    save_every: int = option(0, "Checkpoint every N optimizer steps (0 = only at the end)", validator=non_negative)
    keep_checkpoints: int = option(2, "How many step checkpoints to keep", validator=positive)
    resume: bool = option(False, "Continue from the newest complete checkpoint in output_dir")
    log_every: int = option(1, "Log metrics every N optimizer steps", validator=positive)
    eval_every: int = option(
        0, "Held-out acceptance estimate every N optimizer steps (and at the last): the algorithm's teacher-forced "
        "per-depth accuracies and simulated tau on training.eval_samples samples held out of training (both "
        "pipelines; 0 = off)", validator=non_negative,
    )
    eval_samples: int = option(
        32, "Samples held out of training for training.eval_every (a fixed, seeded slice of the dataset)",
        validator=positive,
    )
    eval_chain_prompts: int = option(
        0, "Also a real greedy chain at each training.eval_every estimate: the exported draft's proposer on this "
        "many held-out prompts (their turns before the first reply), eval.steps drafts per cycle, "
        "eval.max_new_tokens tokens, in the trainer's process (rank 0 on Ray; slower: the target generates; 0 = off)", validator=non_negative,
    )


@attrs.define
class InferenceSection:
    backend: str = option("", f"Target backend ({SELECTOR_DEFAULT})")
    num_gpus: int = option(1, "GPUs for target inference in total", validator=positive)
    gpus_per_engine: int = option(1, "GPUs per inference engine (its TP group)", validator=positive)
    batch_size: int = option(1, "Samples per target forward", validator=positive)
    dtype: str = option("auto", "'auto' = bf16 on GPU, fp32 on CPU", choices=DTYPES)
    max_restarts: int = option(
        3, "Ray pipeline: restarts of dead inference engines (in total) before the run fails",
        validator=non_negative,
    )
    max_inflight_per_engine: int = option(
        2, "Ray pipeline: batches queued on each engine (overlaps dispatch round trips with compute)",
        validator=positive,
    )


@attrs.define
class TransferSection:
    store: str = option("", f"Transfer store ({SELECTOR_DEFAULT})")
    max_pool_bytes: int = option(
        4 * 1024**3, "Backpressure: inference pauses while finished samples hold more bytes", validator=positive
    )
    prefetch_steps: int = option(
        2, "Ray pipeline: optimizer steps each trainer fetches ahead on a background thread", validator=positive
    )
    put_threads: int = option(
        4, "Ray pipeline: threads per inference engine writing a batch's samples into the store in "
        "parallel (a single writer is bound by one core's memory-copy speed)", validator=positive
    )


@attrs.define
class LoggingSection:
    progress: bool = option(True, "Show a progress bar")
    wandb: bool = option(False, "Log to Weights & Biases")
    wandb_project: str = option("specforge", "W&B project")
    wandb_mode: str = option("online", "W&B mode", choices=("online", "offline", "disabled"))
    level: str = option("info", "Log level", choices=("debug", "info", "warning", "error"))


@attrs.define
class EvalSection:
    steps: int = option(3, "Draft steps per verification cycle (chain length K)", validator=positive)
    max_new_tokens: int = option(128, "Tokens to generate per prompt", validator=positive)
    data: list[str] = option(factory=list, help="Prompt files (conversation formats); empty = dataset.path",
                              path=True)
    max_prompts: Optional[int] = option(None, "Evaluate at most this many prompts", validator=positive)
    fast: bool = option(False, "Teacher-forced counts (same numbers as the exact loop; skips the greedy-equality guard)")
    engine: str = option("hf", "Who runs the speculation: 'hf' (in-process transformers) or an engine a plugin "
                         "registers (register_eval_engines; `specforge plugins` lists them)")
    engine_python: str = option("", "Python of the engine's own environment (empty: the engine's discovery)",
                                path="path-or-command")
    batch_size: int = option(16, "Prompts per target forward (hf engine)", validator=positive)
    tree: str = option("", "Draft tree instead of a chain, 'topk=8,depth=6,tokens=64' (SGLang --speculative-eagle-topk, "
                       "--speculative-num-steps, --speculative-num-draft-tokens); empty = a chain of eval.steps")
    temperature: float = option(0.0, "Sampling temperature (0 = greedy and guarded; > 0 = speculative sampling)",
                                validator=non_negative)
    seed: int = option(0, "Seed of sampled evaluation (temperature > 0)")


@attrs.define
class ProfilerSection:
    enabled: bool = option(False, "Trace training steps with the PyTorch profiler")
    start_step: int = option(2, "First optimizer step traced", validator=non_negative)
    num_steps: int = option(2, "Steps traced", validator=positive)
    output_dir: str = option("{output_dir}/traces", "Where traces go (open in Perfetto or TensorBoard)", path=True)


# Section name -> class; this order is the order `config show` prints.
@attrs.define
class RegenerateSection:
    """`specforge data regenerate`: the target rewrites every assistant turn of dataset.path."""

    output: str = option("", "Output JSONL (empty = <output_dir>/regenerated.jsonl)", path=True)
    temperature: float = option(0.0, "Sampling temperature (0 = greedy)", validator=non_negative)
    top_p: float = option(1.0, "Nucleus sampling mass", validator=in_range(0, 1, lo_open=True))
    max_new_tokens: int = option(512, "Longest reply per turn; a reply cut here is marked 'truncated'",
                                 validator=positive)
    stop: list[str] = option(factory=list, help="Stop strings (besides the target's end of turn)")
    batch_size: int = option(8, "Conversations generated together", validator=positive)
    seed: int = option(0, "Seed of sampled generation (per batch: reruns give the same records)")
    loop_tokens: int = option(
        64, "A reply that ends in a loop (its last loop_tokens or more tokens repeat one period of at most 64 "
        "tokens, at least 3 times: a greedy target's degenerate answer) drops its conversation with status "
        "'degenerate' (counted in the summary); 0 = keep every reply", validator=non_negative,
    )


# Keys that left the core schema, and where they live now (the loader names the new place).
MOVED_KEYS: dict[str, str] = {
    "training.ttt_length": "model.llama-eagle3.ttt_length (an option of the llama-eagle3 draft, default 7)",
}

CORE_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "dataset": DatasetSection,
    "training": TrainingSection,
    "inference": InferenceSection,
    "transfer": TransferSection,
    "logging": LoggingSection,
    "eval": EvalSection,
    "profiler": ProfilerSection,
    "regenerate": RegenerateSection,
}


@attrs.define
class SpecforgeConfig:
    """The fully resolved config: core sections plus each plugin's structured options."""

    run: RunSection = attrs.field(factory=RunSection)
    model: ModelSection = attrs.field(factory=ModelSection)
    dataset: DatasetSection = attrs.field(factory=DatasetSection)
    training: TrainingSection = attrs.field(factory=TrainingSection)
    inference: InferenceSection = attrs.field(factory=InferenceSection)
    transfer: TransferSection = attrs.field(factory=TransferSection)
    logging: LoggingSection = attrs.field(factory=LoggingSection)
    eval: EvalSection = attrs.field(factory=EvalSection)
    profiler: ProfilerSection = attrs.field(factory=ProfilerSection)
    regenerate: RegenerateSection = attrs.field(factory=RegenerateSection)
    # (section, component name) -> attrs instance of that component's options
    plugin_options: dict[tuple[str, str], Any] = attrs.field(factory=dict)
    # where each value came from: dotted path -> file or "command line" (for error messages)
    sources: dict[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    def options(self, section: str, name: str) -> Any:
        """The options instance of component ``name`` under ``section`` (None if it has none)."""
        return self.plugin_options.get((section, name))

    @property
    def output_dir(self) -> str:
        return self.run.output_dir.replace("{name}", self.run.name)
