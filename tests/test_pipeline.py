"""The study summary says plainly when a plan, the chosen one included, ran slower than fp32."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from mpsearch.backends import get_backend
from mpsearch.pipeline import StudyConfig, StudySteps, summarize
from mpsearch.plan import PrecisionPlan

# measured latency by the scheme the model runs in (bf16 slow, as on AVX2-only CPUs)
MEASURED_MS = {"fp32": 1.0, "bf16": 1.5, "w8a8": 1.02}


class FakeCost:
    fp32_memory_bytes = 4000
    backend = "simulate"  # the backend its kernels were measured on

    def memory_bytes(self, plan) -> int:
        return 2000

    def time_module(self, module: nn.Module) -> float:
        return MEASURED_MS[getattr(module[0], "scheme", SimpleNamespace(name="fp32")).name]


def _workload():
    torch.manual_seed(0)
    return SimpleNamespace(model=nn.Sequential(nn.Linear(32, 32)).eval(), evaluate=lambda m: 1.0)


def test_summary_notes_each_plan_measured_slower_than_fp32() -> None:
    plans = {"best": PrecisionPlan.uniform("bf16"), "uniform:w8a8": PrecisionPlan.uniform("w8a8")}
    df = summarize(_workload(), FakeCost(), plans, backend="simulate", rounds=1)
    assert list(df["plan"]) == ["fp32", "best", "uniform:w8a8"]
    # w8a8 at 1.02x is within the timing noise: no note
    assert list(df["note"]) == ["", "measured 1.50x slower than fp32", ""]


def test_summary_notes_a_plan_that_cannot_run_on_the_backend() -> None:
    plans = {"best": PrecisionPlan.uniform("w4a4"), "uniform:w8a8": PrecisionPlan.uniform("w8a8")}
    df = summarize(_workload(), FakeCost(), plans, backend="cpu", rounds=1)
    assert df.loc[1, "note"].startswith("cannot run: ValueError: The plan cannot run on the 'cpu'")
    assert df["quality"].isna().tolist() == [False, True, False]
    assert list(df.columns) == [
        "plan",
        "quality",
        "memory_mb",
        "latency_ms",
        "memory_ratio",
        "speedup",
        "quality_drop",
        "note",
    ]


def test_the_study_log_says_when_the_chosen_plan_ran_slower_than_fp32() -> None:
    lines: list[str] = []
    steps = StudySteps(StudyConfig(workload="mlp", backend="simulate"), log=lines.append)
    no_uniform = pd.DataFrame(columns=["origin", "state", "assignment"], dtype=str)
    steps.__dict__.update(
        workload=_workload(),
        cost=FakeCost(),
        best=PrecisionPlan.uniform("bf16"),
        result=SimpleNamespace(trials=no_uniform),
    )
    steps.measure()
    assert lines[-1] == (
        "note: the chosen plan was measured 1.50x slower than fp32 (1.5 ms); if speed matters "
        "too, add a latency budget (e.g. latency_fraction: 1.0)"
    )


# --- calibrated rounding and recovery in a study ---------------------------------------------

ROUNDING_STUDY = "studies/digits_rounding.yaml"


def test_the_moe_study_rounds_and_recovers_expert_banks(tmp_path) -> None:
    """``studies/moe.yaml`` (the zoo's Mixtral, shortened): its banks are profiled with GPTQ
    choices, rounded expert by expert and trained by the recovery run."""
    pytest.importorskip("transformers")
    overrides = {
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "schemes": ["w4a16"],
        "budget": {"memory_fraction": 0.4},
        "n_trials": 4,
        "recover": {"steps": 4, "lr": 1.0e-3, "plans": "best"},
    }
    config = StudyConfig.from_yaml("studies/moe.yaml", **overrides)
    outcome = StudySteps(config, log=None, progress=False).run()
    table = outcome.profile.table
    banks = table[table["layer"].str.endswith("mlp.experts")]
    assert set(banks["scheme"]) == set(config.profiled_schemes())
    assert (banks["status"] != "skipped").all()
    from mpsearch.report import StudyRecord

    row = StudyRecord.load(tmp_path / "out").recovery.iloc[0]
    assert row["loss_after"] <= row["loss_before"]


def test_a_study_with_rounding_and_recovery_runs_end_to_end(tmp_path) -> None:
    """The bundled example, on ``simulate`` (w2a16 runs there) under a budget only 2-bit
    plans meet: GPTQ choices are profiled and measured, the chosen plan is fine-tuned, its
    weights stored, the report shows both; a rerun resumes from the finished checkpoint."""
    from mpsearch.report import StudyRecord, build_report

    overrides = {
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "backend": "simulate",
        "budget": {"memory_fraction": 0.12},
        "n_trials": 4,
    }
    config = StudyConfig.from_yaml(ROUNDING_STUDY, **overrides)
    assert config.profiled_schemes() == ["w4a16", "w2a16", "w4a16+gptq", "w2a16+gptq"]
    lines: list[str] = []
    steps = StudySteps(config, log=lines.append, progress=False)
    outcome = steps.run()
    assert set(outcome.profile.table["scheme"]) == set(config.profiled_schemes())
    assert steps.rounder is not None and steps.rounder.options.bias_correction
    # plans with GPTQ choices were quantized with the study's rounder (they cannot run without)
    rounded = outcome.summary[outcome.summary["plan"].str.contains("+gptq", regex=False)]
    assert len(rounded) >= 1 and not rounded["note"].str.startswith("cannot run").any()

    rec = StudyRecord.load(tmp_path / "out")
    row = rec.recovery.iloc[0]
    assert (row["plan"], row["backend"], row["steps"]) == ("best", "simulate", 60)
    assert row["loss_after"] < row["loss_before"]
    assert row["quality_after"] >= row["quality_before"]
    assert rec.info["rounding"]["methods"] == ["gptq"]
    recovered = PrecisionPlan.load(tmp_path / "out" / "recover" / "best.plan.json")
    assert recovered.resolve(outcome.workload.model) == outcome.best.resolve(outcome.workload.model)
    state = torch.load(tmp_path / "out" / "recover" / "best.pt", weights_only=True)
    assert set(state) == set(outcome.workload.model.state_dict())
    assert lines[-1].startswith("recovery (60 steps) of 1 plan(s) in ")

    md = build_report(tmp_path / "out", figures=False).markdown()
    recovery_md = md.split("## Recovery", 1)[1]
    header = next(x for x in recovery_md.split("\n") if x.startswith("|")).replace(" ", "")
    assert header == (
        "|plan|rounding|backend|quality_before|quality_after|quality_gain|loss_before|"
        "loss_after|steps|best_step|seconds|note|"
    )
    assert f"{row['quality_before']:.4f}" in recovery_md
    assert f"{row['quality_after']:.4f}" in recovery_md
    rounding_md = md.split("## Rounding methods", 1)[1].split("##", 1)[0]
    assert "gptq" in rounding_md and "w2a16+gptq" in rounding_md

    # a rerun finds the finished checkpoint and returns its result at once
    again = StudySteps(config, log=None, progress=False)
    again.__dict__["best"] = rec.best
    row2 = again.recovery().iloc[0]
    assert row2["note"] == "resumed from step 60"
    assert (row2["loss_after"], row2["quality_after"]) == (row["loss_after"], row["quality_after"])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "rounding: [gptq, nearest]",
            "The 'rounding.methods' argument must be one of 'adaround', 'gptq'. Got 'nearest' instead.",
        ),
        (
            "rounding: {methods: [gptq], options: {dampening: 0.1}}",
            "rounding.options: unknown option(s) ['dampening']; accepted options: ['act_order', "
            "'adaround_iters', 'adaround_lr', 'adaround_reg', 'bias_correction', 'block_size', "
            "'damp'].",
        ),
        (
            "rounding: {methods: [gptq], options: {damp: 2}}",
            "rounding.options: The 'damp' option must be a number in [0, 1). Got 2 instead.",
        ),
        (
            "rounding: {method: [gptq]}",
            "rounding: unknown key(s) ['method']; accepted keys: ['methods', 'options'].",
        ),
        ("recover: {steps: 0}", "The 'recover.steps' argument must be a positive integer. Got 0"),
        (
            "recover: {plans: all}",
            "The 'recover.plans' argument must be one of 'best', 'front'. Got 'all' instead.",
        ),
        (
            "recover: {step: 10}",
            "recover: unknown key(s) ['step']; accepted keys: ['lr', 'options', 'plans', 'steps'].",
        ),
        ("recover: {options: {loss: hinge}}", "recover.options: The 'loss' option must be one of"),
    ],
)
def test_bad_rounding_and_recover_keys_are_refused_before_any_work(tmp_path, key, message) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(f"workload: mlp\nschemes: [bf16, w4a16]\n{key}\n")
    with pytest.raises(ValueError) as info:
        StudyConfig.from_yaml(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_rounding_needs_a_scheme_that_can_take_it() -> None:
    with pytest.raises(ValueError, match=r"rounding: none of the schemes \['bf16', 'fp8'\]"):
        StudyConfig(workload="mlp", schemes=["bf16", "fp8"], rounding=["adaround"])
    assert StudyConfig(
        workload="mlp", schemes=["bf16", "w8a16"], rounding=[]
    ).profiled_schemes() == [
        "bf16",
        "w8a16",
    ]


def test_rounded_gives_a_model_that_quantizes_to_the_rounded_codes_without_calib() -> None:
    from mpsearch.backends import quantize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    calib = [torch.randn(16, 32) for _ in range(4)]
    steps = StudySteps(StudyConfig(workload="mlp", rounding=["gptq"]), log=None)
    steps.__dict__.update(
        workload=SimpleNamespace(model=net, calib=calib),
        profile=SimpleNamespace(rounder=None),
    )
    plan = PrecisionPlan({"0": "w4a16+gptq"}, default="w8a16")
    model, same = steps.rounded(plan)
    assert same == plan and model.mpsearch_rounded == {"0": "w4a16+gptq"}
    x = torch.randn(8, 32)
    expected = quantize(net, plan, backend="simulate", rounder=steps.rounder)(x)
    assert torch.equal(quantize(model, plan, backend="simulate")(x), expected)  # no calib needed
    bare = PrecisionPlan({"0": "w4a16"}, default="w8a16")
    assert not torch.equal(quantize(net, bare, backend="simulate")(x), expected)  # gptq differs


class _SharedUnused(nn.Module):
    """T5-style: ``shared`` is never called, its weight is held by ``enc``, which is."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(32, 32)
        self.enc = nn.Embedding(32, 32)
        self.enc.weight = self.shared.weight
        self.head = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(ids).mean(1))


def test_a_profile_rounder_without_a_layer_the_model_never_calls_is_not_reused() -> None:
    import mpsearch as mps
    from mpsearch.layers import quantizable_layers

    torch.manual_seed(0)
    net = _SharedUnused().eval()
    calib = [torch.randint(0, 32, (8, 6)) for _ in range(2)]
    prof = mps.profile(net, calib, schemes=["w8a16", "w8a16+gptq"], progress=False)
    assert "shared" not in prof.rounder.layers  # the captured graph never calls it
    steps = StudySteps(StudyConfig(workload="mlp", rounding=["gptq"]), log=None)
    steps.__dict__.update(workload=SimpleNamespace(model=net, calib=calib), profile=prof)
    assert set(steps.rounder.layers) == set(quantizable_layers(net))
    plan = PrecisionPlan.uniform("w8a16+gptq")
    out = steps.quantize(plan, backend="cpu")(calib[0])  # refused the rounder before
    assert out.shape == (8, 4) and torch.isfinite(out).all()


def test_recovery_quality_falls_back_to_simulate_where_the_backend_cannot_run_the_plan() -> None:
    from mpsearch.backends import quantize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(4, 32)
    steps = StudySteps(StudyConfig(workload="mlp", backend="cpu"), log=None)
    steps.__dict__.update(
        workload=SimpleNamespace(model=net, evaluate=lambda m: float(m(x).abs().sum())),
        cost=SimpleNamespace(backend="cpu"),
    )
    plan = PrecisionPlan.uniform("w4a4")  # the cpu backend has no kernel for it
    before, after, backend, note = steps._quality_before_after(
        plan, SimpleNamespace(model=net, plan=plan)
    )
    assert backend == "simulate"
    assert note.startswith(
        "simulated: the 'cpu' backend cannot run it (ValueError: The plan cannot run"
    )
    assert before == after == float(quantize(net, plan, backend="simulate")(x).abs().sum())


def test_smooth_key_folds_smoothquant_scales_before_the_profile() -> None:
    lines: list[str] = []
    steps = StudySteps(StudyConfig(workload="text_transformer", smooth=0.5), log=lines.append)
    wl = steps.workload
    plain = StudySteps(StudyConfig(workload="text_transformer"), log=None).workload
    assert wl.model is not plain.model
    x = wl.example_input
    with torch.no_grad():
        torch.testing.assert_close(wl.model(x), plain.model(x), rtol=1e-4, atol=1e-4)
    assert any(line.startswith("smoothing (alpha 0.5):") for line in lines), lines
    assert StudyConfig(smooth={"alpha": 0.7}).smooth_alpha() == 0.7
    assert StudyConfig(smooth={"alpha": "auto"}).smooth_alpha() == "auto"
    with pytest.raises(ValueError, match="smooth: unknown key"):
        StudyConfig(smooth={"beta": 1})
    with pytest.raises(ValueError, match="'smooth' argument must be null, 'auto', a number in"):
        StudyConfig(smooth=2)
    with pytest.raises(ValueError, match="'smooth' argument must be null, 'auto'.* Got 'max'"):
        StudyConfig(smooth="max")


def test_a_study_refuses_a_whole_model_backend_before_any_work() -> None:
    with pytest.raises(ValueError, match="'cpu-pt2e' quantizes the whole model at once"):
        StudyConfig(workload="digits_cnn", backend="cpu-pt2e")
    with pytest.raises(ValueError, match="'backend'"):
        StudyConfig(workload="digits_cnn", backend="tpu")


def test_a_decoding_study_times_plans_by_decoding_and_reports_the_controller(tmp_path) -> None:
    """``studies/lm.yaml`` on the tiny LM: plans are timed per decoded token (not on a one-token
    forward without a cache), the speculative controller reproduces its reference, and the
    report shows both."""
    from mpsearch.report import build_report

    config = StudyConfig.from_yaml(
        "studies/lm.yaml",
        workload="stdlib_lm_tiny",
        workload_options={"n_calib": 4, "n_test": 4, "batch_size": 4},
        n_trials=4,
        rounding=None,
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        decode={"prompt_len": 8, "new_tokens": 6, "prompts": 1, "drafts": ["w4a16"],
                "ks": [0, 2], "references": ["fp32"], "compile": False},
    )  # fmt: skip
    lines: list[str] = []
    steps = StudySteps(config, log=lines.append, progress=False)
    outcome = steps.run()
    assert any(x.endswith("(ms per decoded token, eager)") for x in lines)
    summary = outcome.summary.set_index("plan")
    assert summary["latency_ms"].notna().all() and (summary["latency_ms"] > 0).all()
    spec = steps.speculative().iloc[0]
    assert spec["exact"] and spec["k"] >= 1 and spec["tokens_per_s"] > 0
    md = build_report(tmp_path / "out", figures=False).markdown()
    assert "Speculative decoding" in md


@pytest.mark.skipif(
    get_backend("cpu-pt2e").unavailable_reason() is not None,
    reason=str(get_backend("cpu-pt2e").unavailable_reason()),
)
def test_deploy_backends_measure_the_plans_they_can_run_beside_fp32(tmp_path) -> None:
    """A study searched on ``simulate``, deployed on ``cpu-pt2e``: the plans it runs get rows
    beside fp32 (and in the report); a 2-bit plan is left out with the reason."""
    config = StudyConfig(
        workload="digits_cnn",
        backend="simulate",
        schemes=["w8a8", "w2a16", "w2a16_pc"],
        n_trials=4,
        deploy=["cpu-pt2e"],
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        storage=f"sqlite:///{tmp_path / 'study.db'}",
    )
    lines: list[str] = []
    steps = StudySteps(config, log=lines.append, progress=False)
    summary = steps.run().summary.set_index("plan")
    row = summary.loc["uniform:w8a8@cpu-pt2e"]
    assert row["latency_ms"] > 0 and row["speedup"] > 0
    assert row["quality"] == pytest.approx(summary.loc["fp32", "quality"], abs=0.05)
    assert row["memory_mb"] == summary.loc["uniform:w8a8", "memory_mb"]
    assert any(x.startswith("deploy backend 'cpu-pt2e': ") for x in lines)
    from mpsearch.report import build_report

    assert "uniform:w8a8@cpu-pt2e" in build_report(tmp_path / "out", figures=False).markdown()

    two_bit = {"w2a16": PrecisionPlan.uniform("w2a16")}
    rows = steps._deploy_rows(get_backend("cpu-pt2e"), two_bit, None)
    assert rows.empty  # no 2-bit kernel on CPU
    assert lines[-2].startswith("note: w2a16@cpu-pt2e left out: cannot run")
    assert lines[-1].startswith("deploy backend 'cpu-pt2e': 0 of 1 plans ran")


@pytest.mark.parametrize(
    ("deploy", "message"),
    [
        (["tpu"], "'deploy' argument must be one of"),
        (["simulate"], "'deploy' argument must be a backend that runs real kernels"),
        ("cpu-pt2e", "'deploy' argument must be a list of backend names"),
    ],
)
def test_bad_deploy_backends_are_refused_before_any_work(deploy, message) -> None:
    with pytest.raises(ValueError, match=message):
        StudyConfig(workload="digits_cnn", deploy=deploy)


def test_profile_and_cost_sections_reach_the_profile_and_the_cost_model(tmp_path) -> None:
    """Bug: the README said a study's ``profile:`` and ``cost:`` sections hold those options;
    the config refused both keys."""
    config = StudyConfig(
        workload="mlp",
        schemes=["w8a8"],
        cache_dir=str(tmp_path),
        profile={"metric": "mse", "e2e_samples": None},
        cost={"repeats": 2, "warmup": 0},
    )
    steps = StudySteps(config, log=None)
    assert steps.profile.e2e_metric == "mse"
    default = StudyConfig(workload="mlp", schemes=["w8a8"], cache_dir=str(tmp_path))
    assert StudySteps(default, log=None).profile.e2e_metric == "kl"  # same cache, own rows
    options = config.cost_options(timer="wall")
    assert (options.repeats, options.warmup, options.timer) == (2, 0, "wall")
    assert steps.cost.fp32_latency_ms > 0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"profile": {"metric": "kl_last"}}, "'metric' option must be None, one of"),
        (
            {"profile": {"max_batches": 2}},
            "'max_batches' is set by the study, from the top-level key profile_batches",
        ),
        ({"profile": ["metric"]}, "'profile' argument must be a mapping of profile option names"),
        ({"cost": {"repeat": 2}}, r"Unknown measure_cost option\(s\) \['repeat'\]"),
        ({"cost": {"timer": "wall"}}, "'timer' is set by the study, from the top-level key timer"),
    ],
)
def test_bad_profile_and_cost_sections_are_refused_before_any_work(section, message) -> None:
    with pytest.raises(ValueError, match=message):
        StudyConfig(workload="mlp", **section)
