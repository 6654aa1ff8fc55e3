"""deploy/k8s: every overlay renders with `kubectl kustomize`, passes `kubernetes-validate --strict` against
Kubernetes 1.30's schema, and means what deploy/k8s/README.md says (a GPU per pod, the API key only from a
Secret, a grace period to checkpoint, shared volumes, non-root with a read-only root file system). The image itself
runs under the run Job's pod settings (read-only root, its emptyDirs as tmpfs, uid 1000) on the real
Docker engine. No cluster runs here: applying the manifests to one is not tested.

    CI=true .venv/bin/python -m pytest -q tests/test_k8s.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from containers import app_image  # noqa: F401  (the session fixture)
from idx import write_dataset

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("run", "agents", "offline-postgres")
KUBERNETES = "1.30.0"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
GRACE_S = 60  # what a run needs to checkpoint: compose's stop_grace_period and launch's default


def need(path: str | None, what: str) -> str:
    if not path:
        message = f"{what} not found"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI must run the Kubernetes manifest tests)")
        pytest.skip(message)
    return path


def render(overlay: str) -> str:
    kubectl = need(shutil.which("kubectl"), "kubectl (with kustomize)")
    r = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def validate(text: str, tmp: Path) -> subprocess.CompletedProcess:
    need(str(VALIDATE) if VALIDATE.exists() else None, "kubernetes-validate (pip install -e '.[dev]')")
    path = tmp / "rendered.yaml"
    path.write_text(text)
    return subprocess.run([str(VALIDATE), "-k", KUBERNETES, "--strict", "--quiet", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def docs(text: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


def job_of(rendered: dict) -> dict:
    (job,) = [d for (kind, _), d in rendered.items() if kind == "Job"]
    return job


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_passes_strict_validation(overlay: str, tmp_path: Path):
    text = render(overlay)
    r = validate(text, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # the validator is not a rubber stamp: a misspelled field in the same manifests fails it
    bad = validate(text.replace("terminationGracePeriodSeconds", "terminationGracePeriodSecond"), tmp_path)
    assert bad.returncode != 0 and "terminationGracePeriodSecond" in bad.stdout + bad.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_means_what_it_says(overlay: str):
    rendered = docs(render(overlay))
    job = job_of(rendered)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # one GPU per pod, requested as the NVIDIA device plugin's resource
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the API key comes from a Secret the user creates; no literal key anywhere, not in the ConfigMap either
    env = {e["name"]: e for e in container["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "wandb", "key": "api-key", **({"optional": True} if overlay != "agents" else {})}
    assert "value" not in env["WANDB_API_KEY"]
    (settings,) = [d for (kind, _), d in rendered.items() if kind == "ConfigMap"]
    assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
    assert settings["metadata"]["name"].startswith("mnist-settings-")  # hashed: a change rolls new pods
    assert not {k for k in settings["data"] if "KEY" in k or "PASSWORD" in k or k == "SWEEP_STORAGE"}
    # time to checkpoint on SIGTERM; an eviction is not counted as a failure
    assert pod["terminationGracePeriodSeconds"] >= GRACE_S
    assert pod["restartPolicy"] == "Never"
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in \
        job["spec"]["podFailurePolicy"]["rules"]
    # the three volumes, shared by pods on many nodes; scratch space for a read-only root
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for setting, path in (("DATA_DIR", "/data"), ("WANDB_DIR", "/runs"), ("OUTPUT_DIR", "/outputs")):
        claim = volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]
        assert rendered[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"], path
        assert env[setting]["value"] == path  # pinned to the volume whatever settings.env says
    for path in ("/tmp", "/home/trainer", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path
    # non-root as the image's user, nothing to escalate, read-only root
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (1000, 1000)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    if overlay == "run":
        assert env["APP_MODE"]["value"] == "run" and "completionMode" not in job["spec"]
        assert env["WANDB_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['batch.kubernetes.io/controller-uid']"  # a replacement pod resumes the same run
    else:
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["parallelism"] == job["spec"]["completions"] == 4
        assert env["APP_MODE"]["value"] == "agent"
    if overlay == "offline-postgres":
        assert env["SWEEP_STORAGE"]["valueFrom"]["secretKeyRef"] == {"name": "mnist-sweep-db", "key": "url"}
        assert settings["data"]["SWEEP_CONFIG"] == "/app/sweeps/grid.yaml"
        assert settings["data"]["WANDB_MODE"] == "offline"
        assert (REPO / settings["data"]["SWEEP_CONFIG"].removeprefix("/app/")).is_file()  # in the image


def test_the_shipped_settings_hold_no_secret():
    lines = (K8S / "base" / "settings.env").read_text().splitlines()
    keys = {line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")}
    assert keys and not {k for k in keys if "KEY" in k or k in ("SWEEP_STORAGE", "DATA_DIR", "WANDB_DIR", "OUTPUT_DIR")}


@pytest.mark.container
def test_the_image_trains_under_the_run_jobs_pod_settings(app_image: str, tmp_path: Path):
    """docker run with what the run Job asks of the image: read-only root, emptyDirs as tmpfs, its user,
    no capabilities; the volumes are host folders owned by that user (fsGroup's job on a cluster)."""
    job = job_of(docs(render("run")))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    args = ["docker", "run", "--rm", "--user", f"{uid}:{gid}", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges"]
    if container["securityContext"]["readOnlyRootFilesystem"]:
        args.append("--read-only")
    for m in container["volumeMounts"]:
        if "emptyDir" in volumes[m["name"]]:
            args += ["--tmpfs", f"{m['mountPath']}:uid={uid},gid={gid}"]
        else:
            host = tmp_path / m["name"]
            host.mkdir()
            if m["mountPath"] == "/data":
                write_dataset(host, "mnist", n_train=600, n_test=100)
            if os.geteuid() == 0:
                subprocess.run(["chown", "-R", f"{uid}:{gid}", str(host)], check=True)
            args += ["-v", f"{host}:{m['mountPath']}"]
    for e in container["env"]:
        if "value" in e:
            args += ["-e", f"{e['name']}={e['value']}"]
    args += ["-e", "WANDB_MODE=offline", "-e", "ALLOW_CPU=true", "-e", "EPOCHS=1", "-e", "VAL_SIZE=100",
             "-e", "TRAIN_STRIDE=1", "-e", "WATCH_LOG=none", app_image]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Read-only file system" not in r.stdout + r.stderr
    assert list((tmp_path / "outputs").glob("*/model.onnx")) and list((tmp_path / "runs").glob("wandb/offline-run-*"))


def test_settings_made_from_a_users_env_as_readme_says(tmp_path: Path):
    """deploy/k8s/README.md's command turns a filled-in .env into base/settings.env: the overlays still validate and
    neither the API key nor the database URL reaches the ConfigMap."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    secret_key, db_url = "k" * 40, "postgresql://sweep:hunter2@db:5432/sweeps"
    env = (REPO / ".env.example").read_text()
    for key, value in (("WANDB_API_KEY", secret_key), ("SWEEP_STORAGE", db_url), ("SWEEP_ID", "team/pytorch-mnist/abc123")):
        assert f"\n{key}=\n" in env
        env = env.replace(f"\n{key}=\n", f"\n{key}={value}\n")
    (tmp_path / ".env").write_text(env)
    readme = (K8S / "README.md").read_text()
    command = next(line.split("#")[0].strip() for line in readme.splitlines() if "> deploy/k8s/base/settings.env" in line)
    subprocess.run(["bash", "-c", command.replace("deploy/k8s", str(copy))], cwd=tmp_path, check=True)
    kubectl = need(shutil.which("kubectl"), "kubectl (with kustomize)")
    for overlay in OVERLAYS:
        r = subprocess.run([kubectl, "kustomize", str(copy / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert secret_key not in r.stdout and "hunter2" not in r.stdout
        assert validate(r.stdout, tmp_path).returncode == 0
        (settings,) = [d for (kind, _), d in docs(r.stdout).items() if kind == "ConfigMap"]
        assert settings["data"]["SWEEP_ID"] == "team/pytorch-mnist/abc123"
