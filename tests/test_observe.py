"""Seeing a run: the held-out loss while training (log, qtune.json, loss.png, TensorBoard), train.report_to, and
that an evaluation never changes what is trained (nor a resume's bit-exact result)."""

import importlib.util
import json
import shutil

import pytest

from qtune.config import ConfigError, load_config
from qtune.config.schema import REPORT_TO
from qtune.lora import read_meta
from qtune.train import checkpoint
from qtune.train.loss_curve import loss_curve_png
from recipes import classify, sft
from tests.conftest import tiny_run
from tests.test_resume import ROWS, same_weights

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):
    return tiny_run(
        tmp_path,
        tiny_model_dir,
        ROWS,
        "data.eval_fraction=0.25",  # 8 of the 32 rows held out
        "train.max_steps=8",
        "train.lr=1e-2",
        "train.logging_steps=1",
        "train.save_every=4",
        "lora.dropout=0.1",  # dropout draws random numbers: an evaluation must not shift them
        "eval.max_new_tokens=2",
    )


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logdir`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for run in sorted(p for p in logdir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


def test_the_held_out_loss_is_logged_recorded_plotted_and_sent_to_tensorboard(cfg, capsys):
    # eval_every unset: every save_every (4) steps, given held-out data; the sample holds all 8 held-out rows.
    out = sft.main(cfg())
    meta = read_meta(out)
    curve = meta["training"]["eval_loss_curve"]
    assert [step for step, _ in curve] == [4, 8]
    assert all(0 < loss < 20 for _, loss in curve)
    # The same loss as training's (trained positions only), on the same 8 examples as the held-out loss after
    # training: at the last step the two agree (up to how the trainer averages its evaluation batches).
    assert curve[-1][1] == pytest.approx(meta["metrics"]["loss"], rel=0.05)
    losses = meta["training"]["loss_curve"]
    assert [s for s, _ in losses] == list(range(1, 9))  # the training loss is logged as before
    assert "'eval_loss'" in capsys.readouterr().out  # the console line, as the training loss's
    title = f"run: {meta['config']['model']['name']}, LoRA r=4"
    assert (out / "loss.png").read_bytes() == loss_curve_png(losses, title, curve) != loss_curve_png(losses, title)

    if TENSORBOARD:  # train.report_to=auto: TensorBoard beside the adapter, whose folder stays plain PEFT files
        assert sorted(p.name for p in out.parent.iterdir()) == ["run", "run.runs"]
        logged = scalars(out.parent / "run.runs")
        assert [s for s, _ in logged["train/loss"]] == list(range(1, 9))
        assert logged["eval/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in curve]
        assert not any(p.is_dir() for p in out.iterdir())


@pytest.mark.skipif(not TENSORBOARD, reason="the tensorboard package is not installed (pip install tensorboard)")
def test_evaluating_changes_nothing_that_is_trained_and_a_resume_stays_bit_exact(cfg, tmp_path):
    """With dropout on: a run with no evaluation, one evaluating every 3 steps (between its checkpoints), and that
    one interrupted after step 4 and resumed give the same adapter, bit for bit, and the same held-out curve."""
    plain = sft.main(cfg("train.eval_every=0", "output.name=plain"))
    assert read_meta(plain)["training"]["eval_loss_curve"] == []
    watched = ["train.eval_every=3", "train.save_every=2", "train.save_limit=10", "output.keep_checkpoints=true"]
    evaluated = sft.main(cfg(*watched))
    same_weights(plain, evaluated)
    curve = read_meta(evaluated)["training"]["eval_loss_curve"]
    assert [s for s, _ in curve] == [3, 6, 8]

    # Interrupted after the checkpoint of step 4: what a kill leaves (the steps past it never written).
    folder = checkpoint.root(cfg())
    for step in (6, 8):
        shutil.rmtree(folder / f"checkpoint-{step}")
    (folder / checkpoint.FINISHED).unlink()
    resumed = sft.main(cfg(*watched, "resume=auto", "output.overwrite=true"))
    meta = read_meta(resumed)
    assert meta["training"]["resumed_from_step"] == 4
    same_weights(plain, resumed)
    assert meta["training"]["eval_loss_curve"] == curve
    # TensorBoard: the first start and the resumed one, each its own run under run.runs/.
    assert len([p for p in (tmp_path / "adapters" / "run.runs").iterdir()]) == 2


def test_classification_logs_its_held_out_loss_too(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    texts = [("the movie was great", "pos"), ("a dull boring film", "neg"), ("wonderful film", "pos")] * 3
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in texts))
    out = classify.main(
        load_config(
            None,
            [
                "recipe=classify",
                f"model.name={tiny_model_dir}",
                "model.dtype=fp32",
                "quant.method=none",
                f"data.train={data}",
                f"data.eval={data}",
                "train.max_steps=3",
                "train.batch_size=4",
                "train.eval_every=2",
                "train.eval_max_examples=5",
                "train.report_to=none",
                "lora.r=4",
                f"output.dir={tmp_path / 'adapters'}",
                "output.name=cls",
            ],
        )
    )
    assert [s for s, _ in read_meta(out)["training"]["eval_loss_curve"]] == [2, 3]  # and at the last step
    assert sorted(p.name for p in out.parent.iterdir()) == ["cls"]  # report_to=none: no TensorBoard folder


def test_eval_every_without_held_out_data_is_refused_before_the_model_loads(cfg, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sft.models, "load_base", no_model)
    with pytest.raises(
        ConfigError, match=r"train.eval_every=5 needs held-out data: set data.eval .* data.eval_fraction"
    ):
        sft.main(cfg("data.eval_fraction=0", "train.eval_every=5"))


def test_report_to_is_checked(cfg, monkeypatch):
    assert cfg().train.report_to == "auto"
    assert cfg("train.report_to=tensorboard,wandb").train.report_to == ["tensorboard", "wandb"]
    assert cfg("train.report_to=[wandb]").train.report_to == ["wandb"]
    with pytest.raises(ConfigError, match=r"train.report_to: unknown 'tensorbored'; valid: auto, none, tensorboard, "):
        cfg("train.report_to=tensorbored")
    with pytest.raises(ConfigError, match="auto and none stand alone"):
        cfg("train.report_to=none,wandb")
    for key, value in (("eval_every", -1), ("eval_max_examples", 0)):
        with pytest.raises(ConfigError, match=f"train.{key} must be"):
            cfg(f"train.{key}={value}")

    # An integration whose package is missing fails when the run starts, before the data and the model load.
    missing = next((name for name in REPORT_TO if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("every integration is installed")
    monkeypatch.setattr(sft.data, "load_train", lambda *a, **k: pytest.fail("the data were read"))
    message = rf"train.report_to={missing}: the {missing} package is not installed: pip install {missing}"
    with pytest.raises(ConfigError, match=message):
        sft.main(cfg(f"train.report_to={missing}"))
