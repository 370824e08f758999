"""The launchers in launch/ build the right commands; nothing here calls gcloud, sbatch or kslm."""
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRICKY = """data.sources=corpus/my file's "best" $HOME `x`.jsonl"""


def _load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_pod, multi_gpu, slurm = _load("tpu_pod"), _load("multi_gpu"), _load("slurm")


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any attempt to start a process fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"a dry run tried to execute {a!r}")
    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


TPU_ARGS = ["--name", "kslm-1b", "--zone", "us-east5-a", "--accelerator-type", "v5p-32",
            "--runtime-version", "v2-alpha-tpuv5", "--workdir", "/mnt/gcs/bucket/runs/ko1b"]
TPU = TPU_ARGS + ["--skip-preflight"]  # the preflight has its own tests below


def _remote(cmd):
    assert cmd[-2] == "--command"
    return cmd[-1]


def test_tpu_create_copy_install_train_delete():
    args = tpu_pod.parse_args(TPU + ["--spot", "--project", "proj", "--config", str(REPO / "configs/ko_1b.py"),
                                     "--override", "train.steps=1000", "--override", TRICKY])
    roles = [role for role, _ in tpu_pod.plan(args)]
    assert roles == ["create", "setup", "copy", "install", "train", "delete"]
    create, setup, copy, install, train, delete = tpu_pod.build_commands(args)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "kslm-1b", "--zone", "us-east5-a",
                      "--project", "proj", "--accelerator-type", "v5p-32", "--version", "v2-alpha-tpuv5", "--spot"]
    for cmd in (setup, install, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kslm-1b"]
        assert "--worker=all" in cmd and cmd[cmd.index("--zone") + 1] == "us-east5-a"
    assert _remote(setup).endswith("kslm-venv/bin/pip install -q -U 'jax[tpu]'")
    assert '"$PY" -m venv kslm-venv' in _remote(setup) and "install -y python3.11" in _remote(setup)
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--recurse" in copy and "--worker=all" in copy and copy[-1] == "kslm-1b:kslm/"
    assert {str(REPO / s) for s in ("kslm_jax", "configs", "pyproject.toml", "README.md")} <= set(copy)
    assert _remote(install) == "cd kslm && ../kslm-venv/bin/pip install -q -e ."
    words = shlex.split(_remote(train))  # what the workers' shell will see
    assert words[:6] == ["cd", "kslm", "&&", "env", "KSLM_DISTRIBUTED=1", "PYTHONUNBUFFERED=1"]
    assert words[6:] == ["../kslm-venv/bin/kslm", "train", "--config", "configs/ko_1b.py",
                         "--config.train.steps=1000", f"--config.{TRICKY}",
                         "--workdir", "/mnt/gcs/bucket/runs/ko1b"]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "kslm-1b", "--zone", "us-east5-a",
                      "--project", "proj", "--quiet"]


def test_tpu_queued_waits_and_force_deletes():
    args = tpu_pod.parse_args(TPU + ["--queued", "--spot"])
    steps = tpu_pod.plan(args)
    assert [r for r, _ in steps] == ["create", "wait", "setup", "copy", "install", "train", "delete"]
    create, wait, delete = steps[0][1], steps[1][1], steps[-1][1]
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "kslm-1b", "--zone", "us-east5-a",
                      "--node-id", "kslm-1b", "--accelerator-type", "v5p-32",
                      "--runtime-version", "v2-alpha-tpuv5", "--spot"]
    assert wait[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "kslm-1b"]
    assert "--format=value(state.state)" in wait
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "kslm-1b", "--zone", "us-east5-a",
                      "--force", "--quiet"]
    train = _remote(steps[-2][1])
    assert "--config" not in shlex.split(train)  # no --config: the workdir's config.json is the run's config


def test_tpu_keep_reuse_and_pip_package(tmp_path):
    recipe = tmp_path / "my recipe.py"
    recipe.write_text("")
    args = tpu_pod.parse_args(TPU + ["--keep", "--reuse", "--package", "kslm_jax==0.1.0", "--config", str(recipe),
                                     "--python", "python3.12"])
    steps = tpu_pod.plan(args)
    assert [r for r, _ in steps] == ["setup", "copy", "install", "train"]  # no create, no delete
    assert "PY=python3.12;" in _remote(steps[0][1]) and "for p in" not in _remote(steps[0][1])
    assert steps[1][1][-2:] == [str(recipe), "kslm-1b:kslm/"]  # the recipe travels; the checkout does not
    assert shlex.split(_remote(steps[2][1])) == ["kslm-venv/bin/pip", "install", "-q", "-U", "kslm_jax==0.1.0"]
    words = shlex.split(_remote(steps[3][1]))
    assert words[words.index("--config") + 1] == "my recipe.py"


def test_tpu_dry_run_prints_every_command_and_runs_nothing(no_subprocess, capsys):
    argv = TPU + ["--queued", "--override", TRICKY]
    assert tpu_pod.main(argv + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = tpu_pod.build_commands(tpu_pod.parse_args(argv))
    assert [shlex.split(line) for line in lines] == expected
    assert "delete" in lines[-1] and "kslm train" not in lines[-1]
    assert "kslm train" in lines[-2] and "KSLM_DISTRIBUTED=1" in lines[-2] and "--worker=all" in lines[-2]


def test_tpu_failure_still_deletes_but_not_when_create_failed():
    args = tpu_pod.parse_args(TPU)
    calls = []

    def fake_run(argv, check=False, **kw):
        calls.append(argv)
        failing = "--command" in argv and "kslm train" in argv[-1]
        if failing and check:
            raise subprocess.CalledProcessError(1, argv)
        return subprocess.CompletedProcess(argv, 0, stdout="", stderr="")

    assert tpu_pod.execute(tpu_pod.plan(args), run=fake_run, sleep=lambda s: None) == 1
    assert calls[-1] == tpu_pod.build_commands(args)[-1]  # train failed, delete ran

    calls.clear()

    def create_fails(argv, check=False, **kw):
        calls.append(argv)
        raise subprocess.CalledProcessError(1, argv)

    assert tpu_pod.execute(tpu_pod.plan(args), run=create_fails, sleep=lambda s: None) == 1
    assert calls == [tpu_pod.build_commands(args)[0]]  # nothing of ours exists: nothing deleted

    calls.clear()

    def interrupted(argv, check=False, **kw):
        calls.append(argv)
        if "kslm train" in argv[-1]:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(argv, 0)

    assert tpu_pod.execute(tpu_pod.plan(args), run=interrupted, sleep=lambda s: None) == 130
    assert calls[-1] == tpu_pod.build_commands(args)[-1]  # Ctrl-C during training: the slice is still deleted


def test_remote_commands_are_valid_shell(tmp_path):
    """Every command the workers run parses as bash (bash -n: syntax only, nothing executed)."""
    args = tpu_pod.parse_args(TPU + ["--gcsfuse", "my-bucket", "--override", TRICKY,
                                     "--setup-command", "echo hi"])
    remotes = [_remote(cmd) for role, cmd in tpu_pod.plan(args) if role in ("setup", "install", "train")]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/gcs/my-bucket" in remotes[0]
    assert remotes[0].index("gcsfuse --implicit") < remotes[0].index("echo hi") < remotes[0].index("jax[tpu]")
    for remote in remotes:
        subprocess.run(["bash", "-n", "-c", remote], check=True)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(slurm.parse_args(["--nodes", "2", "--gpus-per-node", "8", "--workdir", "w",
                                                     "--override", TRICKY])))
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_train_command_reaches_kslm_intact(tmp_path):
    """Run the workers' train command in bash against a stand-in `kslm` that prints what it received."""
    (tmp_path / "kslm").mkdir()
    fake = tmp_path / "kslm-venv" / "bin" / "kslm"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "KSLM_DISTRIBUTED=$KSLM_DISTRIBUTED"\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    args = tpu_pod.parse_args(TPU + ["--override", TRICKY, "--config", "tiny_ko"])
    out = subprocess.run(["bash", "-c", tpu_pod.train_command(args)], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines() == ["KSLM_DISTRIBUTED=1", "train", "--config", "tiny_ko", f"--config.{TRICKY}",
                                "--workdir", "/mnt/gcs/bucket/runs/ko1b"]


def test_tpu_queued_wait_polls_until_active():
    states = iter(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    seen = []

    def fake_run(argv, **kw):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout=next(states) + "\n")

    tpu_pod.wait_active(["describe"], run=fake_run, sleep=lambda s: None)
    assert len(seen) == 3
    with pytest.raises(RuntimeError, match="FAILED"):
        tpu_pod.wait_active(["d"], run=lambda a, **k: subprocess.CompletedProcess(a, 0, stdout="FAILED"),
                            sleep=lambda s: None)


@pytest.mark.parametrize("bad", [["--name", "Bad_Name"], ["--override", "steps=3"], ["--override", "a.b"]])
def test_tpu_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit):
        tpu_pod.parse_args(TPU + bad)


def test_multi_gpu_env_and_mesh(no_subprocess, capsys):
    args = multi_gpu.parse_args(["--gpus", "0,1,2,3", "--fsdp", "2", "--tensor", "2", "--config", "configs/ko_1b.py",
                                 "--override", TRICKY, "--workdir", "runs/ko1b"])
    env, argv = multi_gpu.build(args, environ={"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "NCCL_NVLS_ENABLE": "0",
                   "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true"}
    assert argv == ["kslm", "train", "--config", "configs/ko_1b.py", f"--config.{TRICKY}",
                    "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.mesh.data=-1",
                    "--workdir", "runs/ko1b"]
    assert multi_gpu.main(["--gpus", "0,1", "--fsdp", "2", "--workdir", "w", "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1" in words and "NCCL_NVLS_ENABLE=0" in words
    assert words[words.index("kslm"):] == ["kslm", "train", "--config.mesh.fsdp=2", "--config.mesh.data=-1",
                                           "--workdir", "w"]


def test_multi_gpu_without_mesh_flags_leaves_mesh_alone():
    env, argv = multi_gpu.build(multi_gpu.parse_args(["--workdir", "w"]), environ={})
    assert "CUDA_VISIBLE_DEVICES" not in env and env["NCCL_NVLS_ENABLE"] == "0"
    assert argv == ["kslm", "train", "--workdir", "w"]
    with pytest.raises(SystemExit):  # 3 GPUs cannot hold fsdp=2
        multi_gpu.parse_args(["--gpus", "0,1,2", "--fsdp", "2", "--workdir", "w"])


def test_slurm_script(no_subprocess, capsys):
    argv = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00", "--job-name", "ko1b",
            "--config", "configs/ko_1b.py", "--workdir", "/shared/runs/my run", "--override", TRICKY, "--dry-run"]
    assert slurm.main(argv) == 0
    script = capsys.readouterr().out
    assert script == slurm.render(slurm.parse_args(argv))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("--job-name=ko1b", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                 "--partition=gpu", "--time=24:00:00", "--signal=TERM@120"):
        assert f"#SBATCH {want}" in lines
    assert "export KSLM_DISTRIBUTED=1" in lines
    assert 'export KSLM_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):29500"' in lines
    assert 'export KSLM_NUM_PROCESSES="$SLURM_NNODES"' in lines
    assert any(line.startswith("export NCCL_NVLS_ENABLE=0") for line in lines)
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1
    words = shlex.split(srun[0])
    assert words[:5] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    inner = words[5]
    assert inner.startswith('export KSLM_PROCESS_ID="$SLURM_NODEID"; exec ')
    assert shlex.split(inner.partition("exec ")[2]) == [
        "kslm", "train", "--config", "configs/ko_1b.py", f"--config.{TRICKY}", "--workdir", "/shared/runs/my run"]


def test_slurm_script_runs_with_stand_ins(tmp_path):
    """Run the whole script in bash with stand-in scontrol, srun (two tasks) and kslm that print what they get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": 'printf "gpu-a17\\ngpu-a18\\n"',
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                'for n in 0 1; do SLURM_NODEID=$n "$@"; done',
        "kslm": 'echo "$KSLM_PROCESS_ID/$KSLM_NUM_PROCESSES $KSLM_COORDINATOR $KSLM_DISTRIBUTED $NCCL_NVLS_ENABLE"\n'
                'for a in "$@"; do echo "$a"; done',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    args = slurm.parse_args(["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/shared/my run",
                             "--override", TRICKY, "--port", "1234"])
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES="2")
    out = subprocess.run(["bash", "-c", slurm.render(args)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    argv = ["train", f"--config.{TRICKY}", "--workdir", "/shared/my run"]
    assert out[0] == "kslm: 2 processes, coordinator gpu-a17:1234"
    assert out[1:] == ["0/2 gpu-a17:1234 1 0", *argv, "1/2 gpu-a17:1234 1 0", *argv]


def test_slurm_writes_and_submits(tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: submitted.append(argv) or
                        subprocess.CompletedProcess(argv, 0))
    path = tmp_path / "job.sbatch"
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/shared/w", "--script", str(path)]) == 0
    assert submitted == [["sbatch", str(path)]]
    assert path.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=kslm\n")


def test_scripts_run_as_files_in_dry_run():
    """`python launch/x.py --dry-run ...` works from any folder (stdlib only, no package import)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, str(REPO / "launch" / "multi_gpu.py"), "--workdir", "w", "--dry-run"],
                         capture_output=True, text=True, check=True, cwd="/", env=env).stdout
    assert out == ("env NCCL_NVLS_ENABLE=0 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true "
                   "kslm train --workdir w\n")


def test_tpu_dry_run_shows_the_preflight_first(no_subprocess, capsys):
    argv = TPU_ARGS + ["--config", "configs/ko_1b.py", "--override", "train.batch_size=64"]
    assert tpu_pod.main(argv + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = shlex.split(lines[0])
    assert first[:4] == [sys.executable, "-m", "kslm_jax", "compile"]
    assert first[4:] == ["--config", "configs/ko_1b.py", "--config.train.batch_size=64", "--topology", "v5p-32"]
    assert "tpu-vm create" in lines[1]
    assert not any("compile" in line for line in tpu_pod.build_commands(tpu_pod.parse_args(TPU)))


def test_tpu_preflight_refusal_creates_nothing(capsys):
    args = tpu_pod.parse_args(TPU_ARGS + ["--config", "configs/ko_1b.py"])
    calls = []

    def compile_refuses(argv, check=False, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 2 if "compile" in argv else 0)

    assert tpu_pod.execute(tpu_pod.plan(args), run=compile_refuses, sleep=lambda s: None) == 2
    assert calls == [tpu_pod.preflight_command(args)]  # no create, no delete
    assert "--skip-preflight" in capsys.readouterr().err
