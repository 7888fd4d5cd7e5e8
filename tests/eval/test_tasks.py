"""Task loaders: one known item per task from the shared data, in the harness's prompt format.

The expected strings were written out by hand from the lm-evaluation-harness
task configs (piqa.yaml, siqa.yaml, hellaswag.yaml + utils.py, arc_easy.yaml,
super_glue/boolq/default.yaml, lambada_openai.yaml, mmlu/default).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fptq.eval.tasks import (
    MMLU_CATEGORIES,
    MMLU_SUBJECT_CATEGORY,
    TASK_METRICS,
    TASKS,
    Item,
    TaskDataNotFoundError,
    hellaswag_preprocess,
    load_mmlu,
    load_task,
    mmlu_subjects,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "tasks").is_dir(), reason=f"shared evaluation data not found at {DATA} (expected ../shared/data)"
)


@pytest.fixture(scope="module")
def cache():
    return {}


def _load(cache, name, **kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in cache:
        cache[key] = load_task(name, DATA, **kw)
    return cache[key]


def _req(item: Item):
    return item.requests()


@needs_data
def test_piqa(cache):
    items = _load(cache, "piqa")
    assert len(items) == 1838
    it = items[1]
    assert _req(it) == [
        ("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
        ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin "),
    ]
    assert it.gold == 1
    assert items[0].gold == 0


@needs_data
def test_siqa(cache):
    items = _load(cache, "siqa")
    assert len(items) == 1954
    it = items[1]
    ctx = (
        "Q: Sydney walked past a homeless woman asking for change but did not have any money they could give"
        " to her. Sydney felt bad afterwards. How would you describe Sydney?\nA:"
    )
    assert _req(it) == [
        (ctx, " sympathetic"),
        (ctx, " like a person who was unable to help"),
        (ctx, " incredulous"),
    ]
    assert it.gold == 0  # label file says 1 -> index 0
    assert items[0].gold == 2  # label 3


@needs_data
def test_hellaswag_preprocess(cache):
    items = _load(cache, "hellaswag")
    assert len(items) == 10042
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].continuations[3] == " starts pulling up roofing on a roof."
    assert items[0].gold == 3
    it = items[3243]  # a WikiHow item: [header]/[title]/[step]/[substeps] markup
    assert it.context == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged."
        " This job requires a high school diploma or equivalent, so make sure to apply yourself and finish"
        " school. If your high school offers these classes, take art, design, and sewing to familiarize"
        " yourself with foundational concepts in fashion."
    )
    assert it.continuations == (
        "  Many high schools have classes offered for their students who do not have a high school diploma,"
        " so be sure to register to take these classes and find a job in your field.. Search for entry-level"
        " positions in fashion industries.",
        " Having an associate's degree in business, political science, economics, or practically anything"
        " else will help you hone and prepare for your future work. Some graduate schools also have dress"
        " code and headband classes for all subjects in their fashion departments.",
        " You should also be able to show the world what fashion is, even the fundamentals. If you have not"
        " achieved your high school diploma or ged, obtain your ged by getting your ged at an accredited"
        " college or applying to a variety of colleges or universities.",
        "  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion industry include art,"
        " fashion merchandising, and marketing.",
    )
    assert it.gold == 3
    assert hellaswag_preprocess(" a [title] b [step] c ") == "a. b c"


@needs_data
def test_arc_easy(cache):
    items = _load(cache, "arc_easy")
    assert len(items) == 2376  # test split, as the harness
    it = items[1]
    ctx = (
        "Question: Which piece of safety equipment is used to keep mold spores from entering the"
        " respiratory system?\nAnswer:"
    )
    assert _req(it) == [(ctx, " safety goggles"), (ctx, " breathing mask"), (ctx, " rubber gloves"), (ctx, " lead apron")]
    assert it.gold == 1


@needs_data
def test_arc_challenge(cache):
    items = _load(cache, "arc_challenge")
    assert len(items) == 299  # validation split: the only local copy
    it = items[1]
    ctx = (
        "Question: High-pressure systems stop air from rising into the colder regions of the atmosphere where"
        " water can condense. What will most likely result if a high-pressure system remains in an area for a"
        " long period of time?\nAnswer:"
    )
    assert _req(it) == [(ctx, " fog"), (ctx, " rain"), (ctx, " drought"), (ctx, " tornado")]
    assert it.gold == 2


@needs_data
def test_boolq(cache):
    items = _load(cache, "boolq")
    assert len(items) == 3270
    it = items[2644]
    ctx = "The season is set for release in 2019.\nQuestion: are they going to make a punisher season 2?\nAnswer:"
    assert _req(it) == [(ctx, " no"), (ctx, " yes")]
    assert it.gold == 1
    assert items[0].gold == 0  # "answer": false


@needs_data
def test_lambada(cache):
    items = _load(cache, "lambada")
    assert len(items) == 5153
    it = items[3604]
    assert _req(it) == [
        (
            "“Happy to comply,” I said.\n“So, you’re Ben. Ben what?” \n“No, I’m Matt…Matt Casale. I live down"
            " the street.”\n“Wasn’t he just calling you ‘Ben’ just now?”\n“No, ‘Bean’—it’s a",
            " nickname",
        )
    ]
    assert items[0].continuations == (" signs",)


@needs_data
def test_mmlu_zero_and_few_shot():
    subj = ["high_school_geography"]
    q = (
        "The main factor preventing subsistence economies from advancing economically is the lack of\n"
        "A. a currency.\nB. a well-connected transportation infrastructure.\nC. government activity.\n"
        "D. a banking service.\nAnswer:"
    )
    head = "The following are multiple choice questions (with answers) about high school geography.\n\n"
    it0 = load_mmlu(DATA, num_fewshot=0, subjects=subj)[0]
    assert _req(it0) == [(head + q, " A"), (head + q, " B"), (head + q, " C"), (head + q, " D")]
    assert it0.gold == 1 and it0.subject == "high_school_geography"
    it1 = load_mmlu(DATA, num_fewshot=1, subjects=subj)[0]
    shot = (
        "The rate of natural increase of a population is found by subtracting the\n"
        "A. crude death rate from the crude birth date.\nB. crude birth rate from the crude death rate.\n"
        "C. doubling time from the crude birth rate.\nD. fertility rate from the crude death rate.\n"
        "Answer: A\n\n"
    )
    assert it1.context == head + shot + q
    five = load_mmlu(DATA, num_fewshot=5, subjects=subj)
    assert five[0].context.count("\nAnswer: ") == 5 and five[0].context.endswith(q)
    with pytest.raises(ValueError):
        load_mmlu(DATA, num_fewshot=6, subjects=subj)


@needs_data
def test_mmlu_subjects_and_categories():
    subjects = mmlu_subjects(DATA)
    assert len(subjects) == 57
    assert set(subjects) == set(MMLU_SUBJECT_CATEGORY)
    counts = {g: sum(v == g for v in MMLU_SUBJECT_CATEGORY.values()) for g in MMLU_CATEGORIES}
    assert counts == {"humanities": 13, "stem": 19, "social_sciences": 12, "other": 13}


def test_registry_and_missing_files(tmp_path):
    assert set(TASKS) == {"piqa", "siqa", "hellaswag", "arc_easy", "arc_challenge", "boolq", "lambada", "mmlu"}
    assert set(TASK_METRICS) == set(TASKS)
    for name in TASKS:
        with pytest.raises(FileNotFoundError) as e:
            load_task(name, tmp_path)
        assert str(tmp_path) in str(e.value)
    with pytest.raises(TaskDataNotFoundError, match=r"piqa[/\\]valid\.jsonl"):
        load_task("piqa", tmp_path)
    with pytest.raises(KeyError):
        load_task("nope", tmp_path)
    with pytest.raises(NotImplementedError):
        load_task("piqa", tmp_path, num_fewshot=5)


def test_user_files_same_format(tmp_path):
    # users' own data dir, laid out like shared/data (here without the tasks/ level)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n")
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "virology_test.csv").write_text('"Q, really?",w,x,y,z,C\n')
    assert load_task("piqa", tmp_path) == [Item("Question: g\nAnswer:", ("a", "b"), 1, doc_id=0)]
    (m,) = load_task("mmlu", tmp_path)
    assert m.context == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "Q, really?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )
    assert m.gold == 2 and m.subject == "virology"
