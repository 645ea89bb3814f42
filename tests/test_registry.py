"""The method registry: a method is one entry (loss, flags, presets, state hooks, report row), picked up by the
config, the loss dispatch, --list_methods and the report; an unknown or half-registered method is a clean error."""

import dataclasses
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILT_IN_ROWS

import config
import datasets
import formats
import label_state
import losses
import methods
import registry
from config import parse_config
from methods import LOSS, Flag, Method, MethodError

# ---------------------------------------------------------------------------------------------------------------------
# A throwaway method, registered for these tests only: AN's BCE times a weight, with its own flag and presets.


def _halved_loss(b: registry.LossInputs) -> torch.Tensor:
    matrix = F.binary_cross_entropy_with_logits(b.logits, b.observed.clamp(min=0).float(), reduction="none")
    return b.cfg.halving * (matrix.mean() if b.reduce is None else b.reduce(matrix))


def _weight_check(value):
    return None if 0 < value <= 1 else f"--halving must lie in (0, 1] (got {value})"


THROWAWAY = Method(
    "halved_an",
    LOSS,
    title="Halved AN",
    summary="AN's BCE times --halving (a test method)",
    loss=_halved_loss,
    flags=(Flag("halving", float, 0.5, "weight of the BCE (default: preset)", check=_weight_check),),
    presets={"halving": registry.from_dataset("halved_an")},  # per dataset: in the dataset entries
    paper={"end_to_end": {"synthetic": 50.0}},
)


@pytest.fixture
def throwaway(monkeypatch):
    registry.register(THROWAWAY)
    synthetic_entry = datasets.DATASET_INFO["synthetic"]
    constants = {**synthetic_entry.method_constants, "halved_an": {"halving": 0.25}}
    monkeypatch.setitem(datasets.DATASET_INFO, "synthetic", dataclasses.replace(synthetic_entry,
                        method_constants=constants))  # fmt: skip
    try:
        yield THROWAWAY
    finally:
        registry.unregister("halved_an")


def test_a_registered_method_gets_its_flag_preset_loss_and_row(throwaway, capsys):
    cfg = parse_config(["--loss", "halved_an", "--exp_name", "x"])
    assert (cfg.loss, cfg.mod_scheme, cfg.halving) == ("halved_an", "AN", 0.25) and "halving" in cfg.from_preset
    assert parse_config(["--loss", "halved_an"]).exp_name.startswith("synthetic_halved_an_s0_")
    given = parse_config(["--loss", "halved_an", "--halving", "0.75", "--exp_name", "x"])
    assert given.halving == 0.75 and "halving" not in given.from_preset
    assert parse_config(["--exp_name", "x"]).halving == 0.5  # not active: the flag's default, not a preset
    # its loss runs through the trainer's dispatch: 0.25 * mean BCE, by hand
    logits, observed = torch.tensor([[0.0, 2.0]]), torch.tensor([[1, 0]])
    value, selected = registry.compute_loss(cfg, logits, observed, torch.tensor([0]), 0.0, label_state.LabelState(None))
    by_hand = 0.25 * (torch.log(torch.tensor(2.0)) + F.softplus(torch.tensor(2.0))) / 2
    assert value.item() == pytest.approx(by_hand.item()) and not selected.any()
    # its row in the report and in --list_methods
    assert registry.row_of(cfg.to_dict()) == "halved_an" and registry.row_title("halved_an") == "Halved AN"
    assert registry.paper_number("halved_an", "end_to_end", "synthetic") == 50.0
    with pytest.raises(SystemExit):
        parse_config(["--list_methods"])
    out = capsys.readouterr().out
    assert "loss halved_an: Halved AN" in out and "--halving: synthetic 0.25; pascal" in out
    # its rules: its flag's check, the LL schemes modify AN's loss only, a dataset without its preset
    for argv, message in [
        (["--loss", "halved_an", "--halving", "2"], "--halving must lie in (0, 1]"),
        (["--loss", "halved_an", "--mod_scheme", "LL-R"], "combine it with --loss an"),
        (["--loss", "halved_an", "--dataset", "pascal"], "--halving has no preset for --dataset pascal"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parse_config([*argv, "--exp_name", "x"])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_removed_method_is_gone_everywhere(capsys):
    registry.register(THROWAWAY)
    try:
        assert config.config_defaults()["halving"] == 0.5  # Config has the field while the entry is registered
    finally:
        registry.unregister("halved_an")
    with pytest.raises(SystemExit) as exc:
        parse_config(["--loss", "halved_an", "--exp_name", "x"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert "halving" not in config.config_defaults()
    with pytest.raises(SystemExit):
        parse_config(["--halving", "0.5"])
    assert registry.row_title("halved_an") == "halved_an"  # a report of old runs still prints


def test_an_unknown_loss_is_a_clean_error_not_another_method():
    cfg = types.SimpleNamespace(loss="nope", mod_scheme="AN")
    with pytest.raises(MethodError, match="unknown loss --loss 'nope': registered are an, wan"):
        registry.compute_loss(cfg, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 0.0, None)
    cfg = types.SimpleNamespace(loss="an", mod_scheme="LL-X")
    with pytest.raises(MethodError, match="unknown scheme --mod_scheme 'LL-X'"):
        registry.compute_loss(cfg, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 0.0, None)


@pytest.mark.parametrize(
    "entry, message",
    [
        (Method("no_loss", LOSS), "a loss needs its batch loss"),
        (Method("no_rate", registry.SCHEME), "a scheme needs its batch loss"),
        (Method("AN", LOSS, loss=_halved_loss), "already registered"),
        (Method("half_state", LOSS, loss=_halved_loss, save_state=lambda s: {}), "save_state and load_state"),
        (Method("lost", LOSS, loss=_halved_loss, parameters=lambda s: []), "must be checkpointed"),
        (Method("bad kind", "trick", loss=_halved_loss), "kind must be one of"),
        (Method("boost2", registry.MODIFIER, title="B2"), "a modifier needs active"),
        (Method("a+b", LOSS, loss=_halved_loss), "the name must be"),
        (Method("clash", LOSS, loss=_halved_loss, flags=(Flag("ls_coef", float, 0.2, "another"),)), "share that Flag"),
        (
            Method(
                "per_dataset",
                LOSS,
                loss=_halved_loss,
                flags=(Flag("pd_w", float, 1.0, "w"),),
                presets={"pd_w": {"coco": 2.0}},
            ),
            "per-dataset values of --pd_w belong in the dataset entries",
        ),
    ],
)
def test_a_half_registered_method_is_refused(entry, message):
    before = dict(registry.REGISTRY)
    with pytest.raises(MethodError, match=message):
        registry.register(entry)
    assert registry.REGISTRY == before


def test_a_preset_for_an_unknown_flag_is_a_clean_error(capsys):
    registry.register(Method("typo", LOSS, loss=_halved_loss, flags=(Flag("typo_w", float, 1.0, "w"),),
                            presets={"typo_ww": 2.0}))  # fmt: skip
    try:
        with pytest.raises(SystemExit) as exc:
            parse_config(["--exp_name", "x"])
        assert exc.value.code == 2
        assert "'typo' presets names --typo_ww, which no entry declares" in capsys.readouterr().err
    finally:
        registry.unregister("typo")
    assert parse_config(["--exp_name", "x"]).loss == "an"


def test_per_image_state_hooks_are_called_and_checkpointed():
    """A method with per-image state: init_state, its checkpoint hooks, after_epoch and the trained-state hooks."""
    calls = []

    def init(cfg, state):
        state.extra["counts"] = torch.zeros(3)
        state.extra["weights"] = torch.nn.Parameter(torch.ones(2))

    def after(cfg, state, epoch, train_scores):
        state.extra["counts"] += train_scores()
        calls.append(epoch)
        return {"counted": float(state.extra["counts"].sum())}

    entry = Method(
        "stateful", LOSS, loss=_halved_loss, init_state=init, after_epoch=after, scores_train_set=True,
        save_state=lambda s: {"counts": s.extra["counts"].clone(), "weights": s.extra["weights"].detach().clone()},
        load_state=lambda s, saved: s.extra.update(counts=saved["counts"].clone()),
        parameters=lambda s: [s.extra["weights"]],
    )  # fmt: skip
    registry.register(entry)
    try:
        cfg = types.SimpleNamespace(loss="stateful", mod_scheme="AN", train_set_variant="observed",
                                    train_mode="end_to_end", boostlu_alpha=0.0, lr=1e-3, lr_mult=10.0)  # fmt: skip
        store = label_state.DenseLabelStore(torch.zeros(3, 2, dtype=torch.int8).numpy(), torch.device("cpu"))
        used = registry.active(cfg)
        state = label_state.LabelState(store, hooks=tuple(m for m in used if m.save_state))
        entry.init_state(cfg, state)
        assert registry.needs_train_scores(cfg)
        assert registry.after_epoch(cfg, state, 1, lambda: torch.ones(3)) == {"counted": 3.0} and calls == [1]
        saved = state.checkpoint()
        assert torch.equal(saved["counts"], torch.ones(3)) and "observed" in saved
        state.extra["counts"].zero_()
        state.restore(saved)
        assert torch.equal(state.extra["counts"], torch.ones(3))
        groups = registry.extra_param_groups(cfg, state)
        assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(1e-2) and groups[0]["params"][0] is state.extra[
            "weights"
        ]  # fmt: skip
        assert set(registry.best_model_extras(cfg, state)) == {"counts", "weights"}
    finally:
        registry.unregister("stateful")


def test_registry_tables_are_complete():
    assert config._registry_problems() == []
    for entry in registry.entries():
        if entry.kind in (registry.LOSS, registry.SCHEME):
            assert entry.loss is not None, entry.name
    # in this order; a researcher's own entries may come between them (docs/extending.md: no test to edit)
    assert tuple(key for key, _, _ in registry.rows() if key in BUILT_IN_ROWS) == BUILT_IN_ROWS
    assert registry.single_process_reason(parse_config(["--loss", "role", "--exp_name", "x"])).startswith(
        "--loss role runs in a single process"
    )
    assert registry.single_process_reason(parse_config(["--loss", "wan", "--exp_name", "x"])) is None
    assert registry.corrects_labels(parse_config(["--mod_scheme", "LL-Cp", "--exp_name", "x"]))
    assert not registry.corrects_labels(parse_config(["--mod_scheme", "LL-Ct", "--exp_name", "x"]))


# ---------------------------------------------------------------------------------------------------------------------
# docs/extending.md's examples, run as written: the doc promises that a method or a dataset is its code, one entry and
# a test, so its code blocks must work against the current registry, config and loaders.


def test_the_extending_doc_examples_run_as_written(tmp_path, monkeypatch, capsys):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 6, "the doc's blocks: the loss, its entry, its tests, the formatter, the dataset, its test"
    loss_code, entry_code, method_tests, formatter_code, dataset_code, dataset_test = blocks
    namespace = dict(vars(losses))
    exec(loss_code, namespace)  # "goes in losses.py"
    monkeypatch.setattr(losses, "focal_an_loss", namespace["focal_an_loss"], raising=False)
    namespace = dict(vars(formats))
    exec(formatter_code, namespace)  # "goes in formats.py"
    for name in ("MYDATA_CLASSES", "format_mydata"):
        monkeypatch.setattr(formats, name, namespace[name], raising=False)
    monkeypatch.setitem(datasets.DATASET_INFO, "mydata", None)  # removed again after the test
    exec(dataset_code, dict(vars(datasets)))  # "goes in datasets.py"
    # A researcher who followed the doc has its entries registered already: set them aside while the doc's run.
    doc_entries = re.findall(r'Method\(\s*"([^"]+)"', entry_code)
    set_aside = [registry.unregister(name) for name in doc_entries if name in registry.REGISTRY]
    registered = set(registry.REGISTRY)
    try:
        exec(entry_code, dict(vars(methods)))  # "goes in methods.py"
        for code, argument in ((method_tests, None), (dataset_test, tmp_path)):
            tests = {}
            exec(code, tests)
            ran = [name for name in tests if name.startswith("test_")]
            assert ran, "each test block defines tests"
            for name in ran:
                tests[name](argument) if argument is not None else tests[name]()
        # what the doc says the entries give, beside their own tests
        assert parse_config(["--dataset", "coco", "--loss", "focal_an"]).exp_name.startswith("coco_focal_an_s0_")
        assert registry.row_title("focal_an") == "Focal AN"
        assert parse_config(["--dataset", "pascal", "--loss", "focal_an", "--exp_name", "x"]).focal_gamma == 2.0
        with pytest.raises(SystemExit) as exc:
            parse_config(["--mod_scheme", "LL-R", "--loss", "focal_an", "--exp_name", "x"])
        assert exc.value.code == 2 and "combine it with --loss an" in capsys.readouterr().err
        cfg = parse_config(["--dataset", "mydata", "--mod_scheme", "LL-R", "--exp_name", "x"])
        assert (cfg.optimizer, cfg.lr, cfg.arch, cfg.image_size, cfg.delta_rel) == ("adam", 1e-4, "resnet50", 448, 0.4)
        # every built-in row runs on it with the entry's constants, or is refused before training
        refused = set()
        for key, _title, flags in registry.rows():
            argv = ["--dataset", "mydata", *flags, "--exp_name", "x"]
            try:
                values = parse_config(argv).to_dict()
            except SystemExit as exc:  # a constant the doc's entry leaves out: named, never guessed
                assert exc.code == 2 and "has no preset for --dataset mydata" in capsys.readouterr().err, key
                refused.add(key)
                continue
            assert "delta_rel" in values["from_preset"], key
        assert refused == {"aevlp"} & set(registry.REGISTRY)  # AEVLP: constants per dataset, no general default
        boostlu = parse_config(["--dataset", "mydata", "--mod_scheme", "LL-Ct", "--boostlu_alpha", "5"])
        assert boostlu.delta_rel == 0.2
        assert parse_config(["--dataset", "mydata", "--loss", "role"]).expected_num_pos == 1.2
    finally:  # whatever the doc's blocks registered, also when one of them failed
        for name in set(registry.REGISTRY) - registered:
            registry.unregister(name)
        for entry in set_aside:
            registry.register(entry)
