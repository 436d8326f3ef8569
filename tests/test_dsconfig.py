import json
import os

import pytest

from sftbench.dsconfig import (DSConfigError, apply_precision, check_ds_config, config_precision, describe,
                               load_ds_config)
from conftest import REPO

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
# DeepSpeed's newer engines on a shipped setting (ds_configs/README.md, "DeepSpeed's newer engines"): not reference
# rows, so not in the sweep's default plan.
ENGINES = sorted((REPO / "ds_configs" / "engines").glob("*.json"))
ENGINE_BASE = {"z2_offload_zenflow": ("z2_offload_5e8", "zero_optimization.zenflow"),
               "z1_deepcompile": ("z1", "compile"), "z3_deepcompile": ("z3", "compile"),
               "z3_deepcompile_offload_opt": ("z3", "compile")}


def test_there_is_a_config_per_reference_setting():
    names = {p.stem for p in CONFIGS}
    readme = (REPO / "ds_configs" / "README.md").read_text()
    for n in names:
        assert f"{n}.json" in readme, f"{n}.json missing from ds_configs/README.md"
    assert len(names) == 18  # the reference's 17 settings + z2_offload_5e8_acc32 (a speed variant)
    ref_files = {line.split("|")[-2].strip() for line in readme.splitlines()
                 if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert {n for n in names if f"{n}.json" in ref_files} == names - {"z2_offload_5e8_acc32"}


def test_acc32_variant_changes_only_the_gradient_accumulation_dtype():
    base = load_ds_config(REPO / "ds_configs" / "z2_offload_5e8.json")
    var = load_ds_config(REPO / "ds_configs" / "z2_offload_5e8_acc32.json")
    assert var.pop("data_types") == {"grad_accum_dtype": "fp32"}
    assert var == base


def test_each_engine_file_is_a_shipped_setting_plus_its_engine_block():
    """What an engine's row is compared with: its base file, which differs from it by the engine's block alone
    (ZenFlow: DeepSpeed's tutorial values; DeepCompile: on, and with its own optimizer-state offload)."""
    assert {p.stem for p in ENGINES} == set(ENGINE_BASE)
    blocks = {}
    for p in ENGINES:
        base_name, key = ENGINE_BASE[p.stem]
        cfg, base = load_ds_config(p), load_ds_config(REPO / "ds_configs" / f"{base_name}.json")
        *parents, leaf = key.split(".")
        holder = cfg
        for k in parents:
            holder = holder[k]
        blocks[p.stem] = holder.pop(leaf)
        assert cfg == base, p.stem
    assert blocks == {
        "z2_offload_zenflow": {"topk_ratio": 0.05, "select_strategy": "auto", "select_interval": "auto",
                               "update_interval": 4, "full_warm_up_rounds": 0, "overlap_step": True},
        "z1_deepcompile": {"deepcompile": True}, "z3_deepcompile": {"deepcompile": True},
        "z3_deepcompile_offload_opt": {"deepcompile": True, "offload_opt_states": True}}


@pytest.mark.parametrize("path", CONFIGS + ENGINES, ids=lambda p: p.stem)
def test_deepspeed_own_parser_accepts(path):
    from deepspeed.runtime.config import DeepSpeedConfig
    for precision in ("bf16", "fp16", "fp32"):
        cfg = apply_precision(load_ds_config(path), precision)
        parsed = DeepSpeedConfig(cfg)
        assert parsed.gradient_accumulation_steps == 8
        assert parsed.train_micro_batch_size_per_gpu == 1
        assert parsed.gradient_clipping == 1.0
        assert parsed.zero_optimization_stage == describe(cfg)["zero_stage"]
        assert parsed.bfloat16_config.enabled == (precision == "bf16")
        assert parsed.float16_config.enabled == (precision == "fp16")


def test_names_match_contents():
    for p in CONFIGS:
        d = describe(load_ds_config(p))
        assert p.stem.startswith(f"z{d['zero_stage']}")
        assert ("offload" in p.stem) == (d["offload_optimizer"] == "cpu")
        assert ("param" in p.stem) == (d["offload_param"] == "cpu")
        assert ("overlap" in p.stem) == bool(d["overlap_comm"])


def test_zenflow_without_a_fixed_update_interval_is_refused_naming_the_key(tmp_path):
    """With update_interval "auto" (DeepSpeed's default) ZenFlow ends each optimizer step when it decides; the
    loop's steps are a fixed number of micro-batches, so the file is refused before anything is built."""
    cfg = json.loads((REPO / "ds_configs" / "engines" / "z2_offload_zenflow.json").read_text())
    p = tmp_path / "zf.json"
    for value in ("auto", None):
        if value is None:
            del cfg["zero_optimization"]["zenflow"]["update_interval"]
        else:
            cfg["zero_optimization"]["zenflow"]["update_interval"] = value
        p.write_text(json.dumps(cfg))
        given = "is 'auto'" if value else "is not given \\(DeepSpeed's default: \"auto\"\\)"
        with pytest.raises(DSConfigError, match=rf"zf\.json: zero_optimization\.zenflow\.update_interval {given}: "
                                                r"ZenFlow then ends each optimizer step when it decides"):
            load_ds_config(p)


def test_an_auto_no_one_resolves_is_refused_naming_file_and_key(tmp_path):
    """"auto" where neither the Trainer's rules (filled in) nor DeepSpeed (passed through) give a value."""
    cfg = json.loads((REPO / "ds_configs" / "z2_offload_5e8.json").read_text())
    cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] = "auto"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(DSConfigError, match=r"bad\.json.*zero_optimization\.offload_optimizer\.pin_memory.*auto"):
        load_ds_config(p)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(DSConfigError, match="not found: .*nope.json"):
        load_ds_config(tmp_path / "nope.json")
    p = tmp_path / "broken.json"
    p.write_text('{"zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(DSConfigError, match=r"broken\.json: not valid JSON at line 1"):
        load_ds_config(p)
    p.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(DSConfigError, match="stage must be 0, 1, 2 or 3"):
        load_ds_config(p)
    p.write_text('{"fp16": {"enabled": true}, "bf16": {"enabled": true}}')
    with pytest.raises(DSConfigError, match="both fp16.enabled and bf16.enabled"):
        load_ds_config(p)


def test_precision_override_is_exclusive():
    cfg = load_ds_config(REPO / "ds_configs" / "z1.json")
    assert config_precision(cfg) == "bf16"
    for prec in ("fp16", "bf16", "fp32"):
        out = apply_precision(cfg, prec)
        assert config_precision(out) == prec
        assert not (out["fp16"]["enabled"] and out["bf16"]["enabled"])
    assert cfg["bf16"]["enabled"] is True  # the loaded dict is not modified
    with pytest.raises(DSConfigError):
        apply_precision(cfg, "int8")


def test_a_config_is_a_file_or_a_ds_configs_name(tmp_path):
    """train.py --ds takes what the sweep's --configs takes: a name in ds_configs/ (with or without .json)."""
    from sftbench.dsconfig import CONFIG_DIR, DSConfigError, resolve_config_path
    assert resolve_config_path("z1") == os.path.join(CONFIG_DIR, "z1.json")
    assert resolve_config_path("z1.json") == os.path.join(CONFIG_DIR, "z1.json")
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_config_path(str(own)) == str(own)
    assert resolve_config_path("engines/z1_deepcompile") == os.path.join(CONFIG_DIR, "engines", "z1_deepcompile.json")
    with pytest.raises(DSConfigError, match=r"DeepSpeed config not found: z9 \(neither a file nor a name in "
                                            r"ds_configs/: z0, z1, .*, engines/z1_deepcompile, "):
        resolve_config_path("z9")
    with pytest.raises(DSConfigError, match="not found: .*nope/z1"):  # a path is not looked up by its base name
        resolve_config_path(str(tmp_path / "nope" / "z1"))


def test_flags_override_the_json_and_say_what_changed():
    from sftbench.dsconfig import apply_overrides
    cfg = load_ds_config(REPO / "ds_configs" / "z1.json")
    out, changes = apply_overrides(cfg, lr=1e-3, grad_accum=1, micro_batch=4, lr_warmup_steps=5, source="z1.json")
    assert out["optimizer"]["params"]["lr"] == 1e-3 and out["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    assert out["gradient_accumulation_steps"] == 1 and out["train_micro_batch_size_per_gpu"] == 4
    assert out["scheduler"]["params"]["warmup_num_steps"] == 5
    assert changes == ["train_micro_batch_size_per_gpu: 1 -> 4 (--micro-batch)",
                       "gradient_accumulation_steps: 8 -> 1 (--grad-accum)",
                       "optimizer.params.lr: 1e-05 -> 0.001 (--lr)",
                       "scheduler.params.warmup_max_lr: 1e-05 -> 0.001 (--lr)",
                       "scheduler.params.warmup_num_steps: 100 -> 5 (--lr-warmup-steps)"]
    assert cfg["gradient_accumulation_steps"] == 8  # the input is not changed
    assert apply_overrides(cfg) == (cfg, [])
    with_tbs, changes = apply_overrides({**cfg, "train_batch_size": 16}, grad_accum=2)
    assert "train_batch_size" not in with_tbs and changes[-1].startswith("train_batch_size: 16 -> removed")


def test_an_override_the_config_has_no_place_for_is_refused():
    from sftbench.dsconfig import apply_overrides
    cfg = load_ds_config(REPO / "ds_configs" / "z1.json")
    no_sched = {k: v for k, v in cfg.items() if k != "scheduler"}
    with pytest.raises(DSConfigError, match="my.json: --lr-warmup-steps needs a scheduler block"):
        apply_overrides(no_sched, lr_warmup_steps=3, source="my.json")
    assert apply_overrides(no_sched, lr=1e-3)[0]["optimizer"]["params"]["lr"] == 1e-3
    with pytest.raises(DSConfigError, match="my.json: --lr needs an optimizer block"):
        apply_overrides({k: v for k, v in cfg.items() if k != "optimizer"}, lr=1e-3, source="my.json")
    one_cycle = {**cfg, "scheduler": {"type": "OneCycle", "params": {}}}
    with pytest.raises(DSConfigError, match="scheduler.type 'OneCycle'"):
        apply_overrides(one_cycle, lr=1e-3)


def test_grad_accum_dtype_reads_deepspeeds_spellings():
    from sftbench.dsconfig import grad_accum_dtype
    for spelled, name in (("fp32", "fp32"), ("FLOAT32", "fp32"), ("float", "fp32"), ("half", "fp16"),
                          ("float16", "fp16"), ("bfloat16", "bf16"), ("bf16", "bf16"), ("int8", "int8")):
        assert grad_accum_dtype({"data_types": {"grad_accum_dtype": spelled}}) == name, spelled
    assert grad_accum_dtype({"data_types": {}}) is None and grad_accum_dtype({}) is None
    assert grad_accum_dtype(None) is None


# ---------------------------------------------------------------------------------------------- Trainer "auto"
# The transformers documentation's ZeRO-2 config, as users have it: every value the Trainer fills in is "auto".
TRAINER_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                       "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_bucket_size": "auto", "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def test_trainer_auto_values_are_filled_in_as_the_trainer_does_and_each_is_named():
    from sftbench.args import PLAIN_DEFAULTS
    from sftbench.dsconfig import resolve_auto

    check_ds_config(TRAINER_ZERO2, "trainer.json")  # loads: every "auto" is one the Trainer fills in
    cfg, lines = resolve_auto(TRAINER_ZERO2, world_size=2, micro_batch=4, grad_accum=None, lr=2e-5,
                              lr_warmup_steps=None, precision="bf16", hidden=64, defaults=PLAIN_DEFAULTS)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 8
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 2e-5, "warmup_num_steps": 100,
                                          "total_num_steps": "auto"}  # the run's length: sftbench.schedule
    assert cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert 'train_batch_size: "auto" -> 64 (world 2 x micro batch 4 x accumulation 8)' in lines
    assert 'gradient_accumulation_steps: "auto" -> 8 (--grad-accum not given: the harness\'s default)' in lines
    assert 'optimizer.params.betas: "auto" -> [0.9, 0.999] (the transformers Trainer\'s default)' in lines
    assert len(lines) == 14  # one per "auto" (15) but total_num_steps


def test_deepspeeds_own_auto_passes_and_any_other_auto_is_refused_naming_the_key():
    zenflow = {"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1, "select_strategy": "auto",
                                                             "select_interval": "auto", "update_interval": 4}}}
    check_ds_config(zenflow, "zf.json")  # (update_interval "auto": test_zenflow_without_a_fixed_update_interval...)
    with pytest.raises(DSConfigError, match=r"zf.json: key 'zero_optimization.stage' is \"auto\", which neither"):
        check_ds_config({"zero_optimization": {"stage": "auto"}}, "zf.json")
