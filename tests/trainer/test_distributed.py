"""The launch contract, and DeepSpeed ZeRO-3 across two CPU processes (gloo) through it. DDP across two
CPU processes: test_correctness.py::test_precomputed_reference_two_processes_matches_the_live_reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer


def test_launch_command_single_node():
    from alignment_trainer.launch import build_launch_command

    cmd = build_launch_command("/etc/alignment/recipe.yaml", "deepspeed-zero3", 8)
    assert cmd[:4] == ["python", "-m", "alignment_trainer.launch", "--config_file"]
    assert cmd[4].endswith("accelerate/zero3.yaml")
    assert Path(cmd[4]).is_file()
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--num_machines") + 1] == "1"
    assert cmd[-3:] == ["-m", "alignment_trainer", "/etc/alignment/recipe.yaml"]
    assert "--mixed_precision" not in cmd and "--cpu" not in cmd


def test_launch_command_multi_node_and_cpu():
    from alignment_trainer.launch import build_launch_command, launch_env

    cmd = build_launch_command("r.yaml", "fsdp", 4, num_machines=2, machine_rank="$(JOB_COMPLETION_INDEX)",
                               main_process_ip="run-sft-0.run-sft", main_process_port=29500)
    assert cmd[cmd.index("--num_processes") + 1] == "8"  # accelerate wants the total
    assert cmd[cmd.index("--machine_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert cmd[cmd.index("--main_process_ip") + 1] == "run-sft-0.run-sft"

    for strategy in ("ddp", "deepspeed-zero3"):
        cpu = build_launch_command("r.yaml", strategy, 2, cpu=True)
        assert cpu[cpu.index("--mixed_precision") + 1] == "no"
        assert "--cpu" not in cpu  # accelerate would run one process, and switch DeepSpeed off
    assert build_launch_command("r.yaml", None, 1) == ["python", "-m", "alignment_trainer", "r.yaml"]
    assert launch_env(cpu=True)["DS_ACCELERATOR"] == "cpu" and "DS_ACCELERATOR" not in launch_env()

    with pytest.raises(ValueError, match="fsdp needs GPUs"):
        build_launch_command("r.yaml", "fsdp", 2, cpu=True)
    with pytest.raises(ValueError, match="main_process_ip"):
        build_launch_command("r.yaml", "ddp", 8, num_machines=2)
    with pytest.raises(ValueError, match="not one of"):
        build_launch_command("r.yaml", "zero4", 8)


def test_accelerate_configs_parse():
    from alignment_trainer.launch import STRATEGIES, accelerate_config_dir

    for name in set(STRATEGIES.values()):
        config = yaml.safe_load((accelerate_config_dir() / name).read_text())
        assert config["num_processes"] == 8 and config["mixed_precision"] == "bf16"
    zero3 = yaml.safe_load((accelerate_config_dir() / "zero3.yaml").read_text())["deepspeed_config"]
    assert zero3 == {"deepspeed_multinode_launcher": "standard", "offload_optimizer_device": "none",
                     "offload_param_device": "none", "zero3_init_flag": True, "zero3_save_16bit_model": True,
                     "zero_stage": 3}


def _two_processes(tmp_path, kit, strategy, method, model, datasets, env=None, **training):
    """Run a stage through build_launch_command on 2 CPU processes; check both were counted."""
    from alignment_trainer.launch import build_launch_command, launch_env

    path = kit.write_recipe(tmp_path, method, model, datasets,
                            training={"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                                      "max_length": 64, "logging_steps": 1, "save_steps": 3, **training})
    proc = kit.run_subprocess(build_launch_command(path, strategy, 2, cpu=True),
                              env={**launch_env(cpu=True), **(env or {})}, timeout=420)
    starts = [e for e in kit.events(proc.stdout) if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2, starts  # printed by the main process only
    out = tmp_path / "out"
    # 2 processes x 4 rows per step: 6 steps cover 48 rows (accelerate counted both processes).
    assert json.loads((out / "result.json").read_text())["global_step"] == 6
    assert kit.metrics(out)[-1]["epoch"] == pytest.approx(48 / 256, abs=0.01)
    return out


def loads_complete(final: Path, reference: str) -> None:
    """final/ loads with plain transformers and holds full (not ZeRO-3-sharded, empty) weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(reference)
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert p.shape == q.shape and p.numel() > 0, name
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed, "final/ equals the starting model: the trained weights were not gathered"


@pytest.mark.slow
def test_zero3_two_cpu_processes_dpo(tmp_path, tiny_model, data_dir, kit):
    """ZeRO-3 DPO with a live reference (itself a ZeRO-3 engine). SFT under ZeRO-3 on two ranks goes the
    same launch and save path (training.train, finish_stage); it runs in the real-node tests
    (tests/cluster/test_real_node.py::test_a_killed_rank_restarts_both_ranks_from_the_checkpoint and the
    other killed-rank tests: world size 2, final/ loads whole)."""
    extensions = tmp_path / "torch_extensions"
    out = _two_processes(tmp_path, kit, "deepspeed-zero3", "dpo", tiny_model, [str(data_dir / "prefs.jsonl")],
                         env={"TORCH_EXTENSIONS_DIR": str(extensions)}, beta=0.1)
    loads_complete(out / "final", tiny_model)
    assert json.loads((out / "result.json").read_text())["rewards/accuracies"] is not None
    # DeepSpeed's CPU shared-memory comm op (inference only) was not compiled for the two ranks'
    # process group (launch.skip_cpu_inference_comm_op): no g++ run, nothing in torch's JIT cache.
    assert not (extensions / "deepspeed_shm_comm").exists(), sorted(p.name for p in extensions.iterdir())

