"""Zero-shot multiple-choice tasks read from local files, with lm-evaluation-harness prompts.

Every loader returns a list of :class:`Item`. An item is scored the way
EleutherAI's lm-evaluation-harness (v0.4.x) scores a ``multiple_choice`` doc: for
each choice the request ``(item.context, item.target_delimiter + choice)`` is
scored as ``log p(continuation | context)``; ``acc`` takes the argmax of the
log-likelihoods and ``acc_norm`` the argmax of the log-likelihoods divided by
``len(choice)`` (characters of the choice *without* the delimiter), exactly as
the harness does.

The prompt formats are copied from the harness task configs:

========== ================================================= =========================
task       context (``doc_to_text``)                          continuations
========== ================================================= =========================
piqa       ``"Question: {goal}\\nAnswer:"``                    ``" " + sol1``, ``" " + sol2``
siqa       ``"Q: {context} {question}\\nA:"``                  ``" " + answerA..C``
hellaswag  ``preprocess(activity_label + ": " + ctx_a + " "``  ``" " + preprocess(ending)``
           ``+ ctx_b.capitalize())``
arc_*      ``"Question: {question}\\nAnswer:"``                ``" " + choices.text[i]``
boolq      ``"{passage}\\nQuestion: {question}?\\nAnswer:"``    ``" no"``, ``" yes"``
lambada    ``" ".join(text.split(" ")[:-1])``                 ``" " + text.split(" ")[-1]``
mmlu       description + k dev shots + ``"{question.strip()}`` ``" A"`` .. ``" D"``
           ``\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:"``
========== ================================================= =========================

(harness files: ``piqa/piqa.yaml``, ``siqa/siqa.yaml``, ``hellaswag/hellaswag.yaml`` +
``hellaswag/utils.py``, ``arc/arc_easy.yaml``, ``super_glue/boolq/default.yaml``,
``lambada/lambada_openai.yaml``, ``mmlu/default/_default_template_yaml``.)

Data layout: ``data_dir`` is laid out like the project's shared data folder, i.e.
``<data_dir>/tasks/<task>/<file>`` (see ``TASK_FILES``). ``data_dir`` may also point
directly at the ``tasks`` folder. Users can supply their own files in the same
formats. A missing file raises :class:`TaskDataNotFoundError` (a
``FileNotFoundError``) naming the expected path.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = [
    "Item",
    "TaskDataNotFoundError",
    "TASKS",
    "TASK_FILES",
    "TASK_METRICS",
    "MMLU_SUBJECT_CATEGORY",
    "MMLU_CATEGORIES",
    "load_task",
    "load_piqa",
    "load_siqa",
    "load_hellaswag",
    "load_arc_easy",
    "load_arc_challenge",
    "load_boolq",
    "load_lambada",
    "load_mmlu",
    "mmlu_subjects",
    "hellaswag_preprocess",
    "resolve_tasks_dir",
    "canonical_task_name",
]


@dataclass(frozen=True)
class Item:
    """One evaluation item.

    ``context``: the prompt; ``choices``: the answer strings *without* the target
    delimiter (their ``len`` is what ``acc_norm`` divides by); ``gold``: index of the
    correct choice; the scored continuation of choice ``i`` is
    ``target_delimiter + choices[i]`` (see :attr:`continuations`).
    ``doc_id`` is the 0-based row in the source file (for MMLU: in the subject's
    test file); ``subject`` is set for MMLU.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    target_delimiter: str = " "
    doc_id: int = -1
    subject: str | None = None

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(self.target_delimiter + c for c in self.choices)

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs to score, one per choice."""
        return [(self.context, c) for c in self.continuations]


class TaskDataNotFoundError(FileNotFoundError):
    """A task's data file is missing."""


# Files each task reads, relative to the tasks folder.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "siqa": ("siqa/dev.jsonl", "siqa/dev-labels.lst"),
    "hellaswag": ("hellaswag/validation.jsonl",),
    "arc_easy": ("arc/arc_easy_test.jsonl",),
    "arc_challenge": ("arc/arc_challenge_validation.jsonl",),
    "boolq": ("boolq/validation.jsonl",),
    "lambada": ("lambada/test.jsonl",),
    "mmlu": ("mmlu/test/<subject>_test.csv", "mmlu/dev/<subject>_dev.csv"),
}

# Metrics the harness reports for each task (acc_norm only where the harness has it;
# lambada is a loglikelihood task: acc = is_greedy, plus perplexity).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "piqa": ("acc", "acc_norm"),
    "siqa": ("acc",),
    "hellaswag": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "boolq": ("acc",),
    "lambada": ("acc", "perplexity"),
    "mmlu": ("acc",),
}


def resolve_tasks_dir(data_dir: str | Path) -> Path:
    """``<data_dir>/tasks`` if it exists, else ``data_dir`` itself."""
    d = Path(data_dir).expanduser()
    return d / "tasks" if (d / "tasks").is_dir() else d


def _require(path: Path, task: str) -> Path:
    if not path.is_file():
        raise TaskDataNotFoundError(
            f"{task}: expected data file {str(path)!r} does not exist "
            f"(data_dir must be laid out as <data_dir>/tasks/{'/'.join(path.parts[-2:])}, "
            "see fptq.eval.tasks.TASK_FILES)"
        )
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_labels(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [int(line.strip()) for line in f if line.strip()]


def _labelled_docs(data_dir: str | Path, task: str, docs_file: str, labels_file: str) -> list[tuple[dict, int]]:
    """(document, label) pairs of a task stored as ``<task>/<docs_file>`` (JSONL) + ``<task>/<labels_file>``."""
    root = resolve_tasks_dir(data_dir)
    p = _require(root / task / docs_file, task)
    pl = _require(root / task / labels_file, task)
    docs, labels = _read_jsonl(p), _read_labels(pl)
    if len(docs) != len(labels):
        raise ValueError(f"{task}: {p} has {len(docs)} rows but {pl} has {len(labels)} labels")
    return list(zip(docs, labels))


# --------------------------------------------------------------------------- tasks


def load_piqa(data_dir: str | Path) -> list[Item]:
    """PIQA validation: ``valid.jsonl`` (goal, sol1, sol2) + ``valid-labels.lst`` (0/1)."""
    return [
        Item(f"Question: {d['goal']}\nAnswer:", (d["sol1"], d["sol2"]), int(y), doc_id=i)
        for i, (d, y) in enumerate(_labelled_docs(data_dir, "piqa", "valid.jsonl", "valid-labels.lst"))
    ]


def load_siqa(data_dir: str | Path) -> list[Item]:
    """Social IQa dev: ``dev.jsonl`` + ``dev-labels.lst`` (labels 1..3)."""
    return [
        Item(f"Q: {d['context']} {d['question']}\nA:", (d["answerA"], d["answerB"], d["answerC"]), int(y) - 1, doc_id=i)
        for i, (d, y) in enumerate(_labelled_docs(data_dir, "siqa", "dev.jsonl", "dev-labels.lst"))
    ]


def hellaswag_preprocess(text: str) -> str:
    """The harness's ``hellaswag/utils.py::preprocess``."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def load_hellaswag(data_dir: str | Path) -> list[Item]:
    """HellaSwag validation (HF fields), with the harness's ``process_docs``."""
    root = resolve_tasks_dir(data_dir)
    p = _require(root / "hellaswag" / "validation.jsonl", "hellaswag")
    items = []
    for i, d in enumerate(_read_jsonl(p)):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        items.append(
            Item(
                hellaswag_preprocess(d["activity_label"] + ": " + ctx),
                tuple(hellaswag_preprocess(e) for e in d["endings"]),
                int(d["label"]),
                doc_id=i,
            )
        )
    return items


def _load_arc(path: Path) -> list[Item]:
    items = []
    for i, d in enumerate(_read_jsonl(path)):
        labels = list(d["choices"]["label"])
        items.append(
            Item(
                f"Question: {d['question']}\nAnswer:",
                tuple(d["choices"]["text"]),
                labels.index(d["answerKey"]),
                doc_id=i,
            )
        )
    return items


def load_arc_easy(data_dir: str | Path) -> list[Item]:
    """ARC-Easy **test** split (the split the harness evaluates): ``arc/arc_easy_test.jsonl``."""
    return _load_arc(_require(resolve_tasks_dir(data_dir) / "arc" / "arc_easy_test.jsonl", "arc_easy"))


def load_arc_challenge(data_dir: str | Path) -> list[Item]:
    """ARC-Challenge from ``arc/arc_challenge_validation.jsonl``.

    NOTE: the harness evaluates ARC-Challenge on the *test* split (1,172 items); the
    only local copy is the *validation* split (299 items), so numbers are not
    directly comparable with published harness results.
    """
    return _load_arc(
        _require(resolve_tasks_dir(data_dir) / "arc" / "arc_challenge_validation.jsonl", "arc_challenge")
    )


def load_boolq(data_dir: str | Path) -> list[Item]:
    """BoolQ validation (``question``, ``passage``, ``answer`` bool); choices no/yes."""
    root = resolve_tasks_dir(data_dir)
    p = _require(root / "boolq" / "validation.jsonl", "boolq")
    items = []
    for i, d in enumerate(_read_jsonl(p)):
        ans = d["answer"] if "answer" in d else d["label"]
        items.append(
            Item(
                f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                ("no", "yes"),
                int(bool(ans)),
                doc_id=i,
            )
        )
    return items


def load_lambada(data_dir: str | Path) -> list[Item]:
    """LAMBADA (OpenAI detokenised) test, as ``lambada_openai``.

    One "choice": the last space-separated word; the scored continuation is
    ``" " + last_word`` and ``acc`` is whether greedy decoding reproduces it
    (``is_greedy``), plus perplexity of the target.
    """
    root = resolve_tasks_dir(data_dir)
    p = _require(root / "lambada" / "test.jsonl", "lambada")
    items = []
    for i, d in enumerate(_read_jsonl(p)):
        words = d["text"].split(" ")
        items.append(Item(" ".join(words[:-1]), (words[-1],), 0, doc_id=i))
    return items


# --------------------------------------------------------------------------- MMLU

# Subject -> category group, as in lm-evaluation-harness mmlu/default/mmlu_<subject>.yaml
# ("tag": "mmlu_<group>_tasks").
MMLU_SUBJECT_CATEGORY: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
MMLU_CATEGORIES: tuple[str, ...] = ("humanities", "stem", "social_sciences", "other")
_MMLU_LETTERS = ("A", "B", "C", "D")


def _read_mmlu_csv(path: Path) -> list[tuple[str, tuple[str, str, str, str], int]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.reader(f):
            if not r:
                continue
            if len(r) != 6:
                raise ValueError(f"{path}: expected 6 columns (question, A, B, C, D, answer), got {len(r)}")
            rows.append((r[0], (r[1], r[2], r[3], r[4]), _MMLU_LETTERS.index(r[5].strip())))
    return rows


def _mmlu_question(question: str, options: Sequence[str]) -> str:
    # _default_template_yaml doc_to_text
    return (
        f"{question.strip()}\nA. {options[0]}\nB. {options[1]}\nC. {options[2]}\nD. {options[3]}\nAnswer:"
    )


def mmlu_subjects(data_dir: str | Path, split: str = "test") -> list[str]:
    """Subjects with a ``mmlu/<split>/<subject>_<split>.csv`` file, sorted."""
    d = resolve_tasks_dir(data_dir) / "mmlu" / split
    if not d.is_dir():
        raise TaskDataNotFoundError(f"mmlu: expected folder {str(d)!r} with <subject>_{split}.csv files")
    suffix = f"_{split}.csv"
    return sorted(p.name[: -len(suffix)] for p in d.glob(f"*{suffix}"))


def load_mmlu(
    data_dir: str | Path,
    num_fewshot: int = 0,
    subjects: Sequence[str] | None = None,
) -> list[Item]:
    """MMLU test split, 0- or k-shot, in the harness's ``mmlu/default`` format.

    Context = ``"The following are multiple choice questions (with answers) about
    {subject with spaces}.\\n\\n"`` + the first ``num_fewshot`` dev examples (harness
    sampler ``first_n``), each rendered as ``doc_to_text + " " + letter + "\\n\\n"``, +
    the test question; choices are the letters ``A``..``D`` (continuations ``" A"``..).
    """
    root = resolve_tasks_dir(data_dir)
    if subjects is None:
        subjects = mmlu_subjects(root)
        if not subjects:
            raise TaskDataNotFoundError(f"mmlu: no <subject>_test.csv files in {str(root / 'mmlu' / 'test')!r}")
    items: list[Item] = []
    for subject in subjects:
        test = _read_mmlu_csv(_require(root / "mmlu" / "test" / f"{subject}_test.csv", "mmlu"))
        prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if num_fewshot > 0:
            dev = _read_mmlu_csv(_require(root / "mmlu" / "dev" / f"{subject}_dev.csv", "mmlu"))
            if num_fewshot > len(dev):
                raise ValueError(f"mmlu/{subject}: num_fewshot={num_fewshot} but only {len(dev)} dev examples")
            for q, opts, ans in dev[:num_fewshot]:
                prefix += _mmlu_question(q, opts) + " " + _MMLU_LETTERS[ans] + "\n\n"
        for i, (q, opts, ans) in enumerate(test):
            items.append(Item(prefix + _mmlu_question(q, opts), _MMLU_LETTERS, ans, doc_id=i, subject=subject))
    return items


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., list[Item]]] = {
    "piqa": load_piqa,
    "siqa": load_siqa,
    "hellaswag": load_hellaswag,
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "boolq": load_boolq,
    "lambada": load_lambada,
    "mmlu": load_mmlu,
}

# Harness task names accepted as aliases.
_ALIASES = {"social_iqa": "siqa", "lambada_openai": "lambada"}


def canonical_task_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return key


def load_task(name: str, data_dir: str | Path, num_fewshot: int = 0, **kwargs) -> list[Item]:
    """Load task ``name`` (a key of :data:`TASKS`) from ``data_dir``.

    ``num_fewshot > 0`` is supported for ``mmlu`` only (few-shot examples come from
    its dev split; the other tasks' training splits are not available locally).
    Extra keyword arguments go to the loader (e.g. ``subjects=`` for mmlu).
    """
    key = canonical_task_name(name)
    if key == "mmlu":
        return load_mmlu(data_dir, num_fewshot=num_fewshot, **kwargs)
    if num_fewshot:
        raise NotImplementedError(f"{key}: only 0-shot is supported (no local few-shot split); use num_fewshot=0")
    return TASKS[key](data_dir, **kwargs)
