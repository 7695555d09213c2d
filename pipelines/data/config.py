"""Config sections of the curation stage (nested under `data:` in a run config). Pure pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.data.readers import expand_paths, hub_files
from pipelines.data.rowformats import check_columns
from pipelines.schema import Section

# Reasons that mean "this row is broken or low quality" count towards data.max_rejected_fraction. Curation
# choices (duplicates, category caps, mixing quota) do not: real data legitimately loses many rows to them.
FAULT_REASONS = ("broken_json", "not_an_object", "missing_field", "wrong_type", "empty_turn", "undecodable",
                 "too_long", "too_short_answer", "repeated_ngrams", "symbol_ratio", "no_assistant_tokens",
                 "mixed_kind", "unsupported_format", "identical_pair")
CURATION_REASONS = ("exact_duplicate", "near_duplicate", "category_cap", "mix_quota")


class FilterSection(Section):
    """Quality filters; each refused row is counted under the filter's name."""

    max_chars: int | None = Field(None, ge=1, description="Refuse rows whose texts total more characters (too_long).")
    min_answer_chars: int = Field(1, ge=1, description="Refuse answers shorter than this (too_short_answer).")
    max_repeated_ngram_ratio: float | None = Field(0.6, ge=0, le=1, description=(
        "Refuse rows where more than this share of word 3-grams repeat an earlier one (repeated_ngrams)."))
    max_symbol_ratio: float | None = Field(0.5, ge=0, le=1, description=(
        "Refuse rows where more than this share of non-space characters are symbols (symbol_ratio)."))


class DedupSection(Section):
    """Exact and near-duplicate removal over the whole dataset (the earliest row of a group is kept)."""

    exact: bool = Field(True, description="Drop exact duplicates of the normalised text (exact_duplicate).")
    near: bool = Field(True, description="Find near-duplicates with MinHash LSH (near_duplicate).")
    threshold: float = Field(0.8, gt=0, le=1, description="Word-3-gram Jaccard at or above which rows are near-twins.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations per signature.")
    action: str = Field("drop", pattern="^(drop|keep)$", description=(
        "'drop' keeps one row per near-duplicate cluster; 'keep' keeps them all but puts a cluster in one split."))


class BalanceSection(Section):
    """Category balancing, from `data.category_field` (or the source file's name when that is unset)."""

    max_per_category: int | None = Field(None, ge=1, description="Keep at most this many rows per category.")
    temperature: float | None = Field(None, gt=0, description=(
        "Sample categories with shares proportional to count^(1/T): 1 keeps all, larger flattens."))


class MixSection(Section):
    """General instruction data mixed in to limit forgetting."""

    path: str | None = Field(None, description="File, folder or glob of general data (same formats as train_path).")
    share: float = Field(0.05, ge=0, lt=1, description="Share of the kept rows that come from `path`.")


class SplitSection(Section):
    """Deterministic seeded split: hash(normalised text of a duplicate cluster + seed) → bucket."""

    train: float = Field(0.8, ge=0, le=1, description="Share of rows in train.")
    validation: float = Field(0.1, ge=0, le=1, description="Share of rows in validation.")
    test: float = Field(0.1, ge=0, le=1, description="Share of rows in test.")
    seed: int = Field(0, description="Split seed: the same seed gives byte-identical split files.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitSection":
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError("split shares must add up to 1")
        return self

    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.validation, self.test)


class PackingSection(Section):
    """Packing tokenized rows into fixed-length blocks (sequences never attend to each other)."""

    enabled: bool = Field(False, description="Pack training rows (needs pipelines.packing.collate in the trainer).")
    block_size: int | None = Field(None, ge=16, description="Tokens per block; default data.max_length.")
    window: int = Field(1024, ge=1, description="Rows considered together when fitting bins (first-fit decreasing).")


class DataConfig(Section):
    """Where the training rows come from, how they are curated, and how they become tokens."""

    train_path: str = Field("pipelines/demo/city_date.jsonl", description=(
        "JSONL, JSON array, Parquet or CSV (JSONL/JSON/CSV also .gz/.zst/.bz2, streamed), or a Hugging Face "
        "datasets folder written by save_to_disk: a file, folder or glob; local or s3://; or a Hugging Face "
        "dataset hf://datasets/<owner>/<name>[:split] (read through `datasets`, default split train)."))
    hf_dataset: str | None = Field(None, description=(
        "A Hugging Face dataset to curate instead of train_path: a hub id, or a local folder "
        "`datasets.load_dataset` reads (its split data.hf_split). Same as train_path=hf://datasets/<id>:<split>."))
    hf_split: str = Field("train", description="The split of data.hf_dataset.")
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "preference", "dialogue", "unpaired",
                    "text"] = Field(
        "auto", description=(
            "Row format of train_path; 'auto' (the default) detects it per row (Alpaca, messages/ShareGPT, TRL "
            "prompt/completion, preference, dialogue pairs, unpaired prompt/completion/label feedback, raw text); a "
            "named format refuses rows in any other."))
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Our roles -> the file's fields, when the names differ: e.g. {prompt: question, completion: answer} or "
        "{instruction: instruction, input: instances[0].input, output: instances[0].output} (dots between names, "
        "[i] for the i-th list element). Roles: instruction, input, output, prompt, completion, chosen, rejected, "
        "messages, text."))
    system_prompt: str | None = Field(None, description="Optional system turn prepended to every conversation.")
    max_length: int = Field(512, ge=16, description="Longest conversation in tokens; longer rows are rejected.")
    truncation: Literal["reject", "drop_oldest_turns"] = Field("reject", description=(
        "Too-long rows: 'reject' (too_long), or drop the oldest user/assistant exchanges (never the last answer, "
        "never cut mid-turn); every truncation is counted."))
    max_row_chars: int = Field(4 << 20, ge=1024, description=(
        "A row whose raw text is longer (characters) is refused as too_long before it is parsed or tokenized: "
        "one pathological row never costs minutes or gigabytes."))
    max_turns: int = Field(512, ge=2, description="A conversation with more turns is refused as too_long.")
    max_rejected_fraction: float = Field(0.2, ge=0, le=1, description=(
        "Stop the run when more than this share of rows is broken or fails quality filters (duplicates, "
        "category caps and mixing quota do not count)."))
    engine: Literal["auto", "ray", "local"] = Field("auto", description=(
        "Where curation and tokenization run: 'ray' (Ray Data tasks across the cluster), 'local' (the same "
        "per-slice functions in forked processes of the driver, one per CPU, no Ray tasks), or 'auto': local when "
        "the input files total at most data.local_max_mib or the Ray cluster is the driver's node alone (Ray Data "
        "tasks would use the same CPUs after seconds of worker start-up and imports), else ray; object-store "
        "inputs: ray. Outputs are identical either way."))
    local_max_mib: float = Field(8.0, ge=0, description=(
        "engine=auto on a multi-node cluster: inputs up to this many MiB run locally."))
    num_blocks: int | None = Field(None, ge=1, description="Read parallelism (files read at once); default all.")
    category_field: str | None = Field(None, description="Row field naming its category; default the file name.")
    task_cpus: float = Field(1.0, ge=0, description=(
        "CPUs per Ray Data task. 0 lets data tasks run beside trainer workers that hold every CPU (a task that "
        "asks for a CPU then waits for one forever)."))
    parse_actors: int | None = Field(None, ge=1, description=(
        "Most Ray Data tasks running the parse pass (curation) and the tokenize pass at once; default: no cap "
        "(as many as the CPUs and blocks allow). A cap leaves CPUs free for other work on a shared cluster."))
    filters: FilterSection = Field(default_factory=FilterSection)
    dedup: DedupSection = Field(default_factory=DedupSection)

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        check_columns(v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.hf_dataset and "train_path" in self.model_fields_set:
            raise ValueError("set data.hf_dataset or data.train_path, not both")
        return self

    def train_files(self) -> list[str]:
        """The files curation reads: data.hf_dataset's cached Arrow files, or train_path expanded."""
        return hub_files(self.hf_dataset, self.hf_split) if self.hf_dataset else expand_paths(self.train_path)

    balance: BalanceSection = Field(default_factory=BalanceSection)
    mix: MixSection = Field(default_factory=MixSection)
    split: SplitSection = Field(default_factory=SplitSection)
    packing: PackingSection = Field(default_factory=PackingSection)
