from sftbench.buildenv import fix_cuda_arch_list, sanitize_arch_list


def test_letter_suffix_is_dropped():
    assert sanitize_arch_list("9.0a") == "9.0"
    assert sanitize_arch_list("8.0;8.6 9.0a+PTX") == "8.0;8.6;9.0+PTX"
    assert sanitize_arch_list("9.0;9.0a") == "9.0"
    assert sanitize_arch_list("10.0a") == "10.0"


def test_env_is_rewritten_and_reported():
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    info = fix_cuda_arch_list(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert info == {"TORCH_CUDA_ARCH_LIST": "9.0", "changed_from": "9.0a"}
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    assert fix_cuda_arch_list(env)["changed_from"] is None
    assert fix_cuda_arch_list({})["TORCH_CUDA_ARCH_LIST"] is None


def test_deepspeed_parses_the_fixed_list(monkeypatch):
    """The trap itself: DeepSpeed's JIT builder parses each arch as ints; '9.0a' fails, the fixed list builds."""
    import pytest
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder
    b = FusedAdamBuilder()
    b.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    with pytest.raises(ValueError, match="0a"):
        b.compute_capability_args()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", sanitize_arch_list("8.0;9.0a"))
    b.compute_capability_args()
    import os
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"


def test_rank_device_on_cpu_takes_the_launchers_local_rank(monkeypatch):
    from sftbench.buildenv import rank_device
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    on_cpu, local_rank, device = rank_device(-1)
    assert (on_cpu, local_rank, device.type) == (True, 1, "cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert rank_device(3)[1] == 3 and rank_device()[1] == 0


def test_single_process_env_fills_in_one_rank():
    from sftbench.buildenv import single_process_env
    env = {"PATH": "/bin"}
    assert single_process_env(env) is True
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_single_process_env_leaves_launched_processes_alone():
    from sftbench.buildenv import single_process_env
    for launched in ({"RANK": "1", "WORLD_SIZE": "2"}, {"OMPI_COMM_WORLD_SIZE": "4"}, {"SLURM_PROCID": "0"}):
        env = dict(launched)
        assert single_process_env(env) is False and env == launched
    env = {"MASTER_PORT": "29999", "LOCAL_RANK": "1"}  # a user's own choices are kept
    single_process_env(env)
    assert env["MASTER_PORT"] == "29999" and env["LOCAL_RANK"] == "1"


def test_cpu_info_is_asked_once_per_machine_and_kept_beside_the_ops(tmp_path, monkeypatch):
    """DeepSpeed's op builders call py-cpuinfo's get_cpu_info (a subprocess, ~1.4 s) twice per op load: after
    cache_cpu_info the first call asks, writes the answer into the folder, and every later call (this process or a
    new one) reads it."""
    import json

    import cpuinfo

    from sftbench.buildenv import cache_cpu_info, cpu_fingerprint

    asked = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or {"arch": "X86_64", "flags": ["avx2"]})
    path = cache_cpu_info(tmp_path)
    assert cache_cpu_info(tmp_path) == path  # installed once
    assert cpuinfo.get_cpu_info() == {"arch": "X86_64", "flags": ["avx2"]} and len(asked) == 1
    assert cpuinfo.get_cpu_info()["flags"] == ["avx2"] and len(asked) == 1
    assert json.loads(open(path).read()) == {"arch": "X86_64", "flags": ["avx2"]}
    # A new process: the wrapper is installed afresh over py-cpuinfo's own function, and reads the file.
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or {"arch": "other"})
    assert cache_cpu_info(tmp_path) == path
    assert cpuinfo.get_cpu_info()["arch"] == "X86_64" and len(asked) == 1
    # The key is the processor, not its clock; another processor or py-cpuinfo version is another file.
    a = "model name\t: Xeon\nflags\t\t: avx2 fma\ncpu MHz\t\t: 2100.000\n"
    assert cpu_fingerprint(a, "x86_64", "9.0.0") == cpu_fingerprint(a.replace("2100.000", "3400.5"), "x86_64",
                                                                       "9.0.0")
    assert cpu_fingerprint(a, "x86_64", "9.0.0") != cpu_fingerprint(a.replace("fma", "avx512f"), "x86_64", "9.0.0")
    assert cpu_fingerprint(a, "x86_64", "9.0.0") != cpu_fingerprint(a, "x86_64", "9.0.1")
