"""``skaffold dev -p local`` redeploys after a source edit (run last: it rolls the release).

A temporary copy of the checkout (its own git repository, as skaffold's gitCommit tagger
needs) runs ``skaffold dev``; once it has deployed, a file of the analyzer is edited and the
analyzer's Deployment must roll to a new image digest with a new, ready pod.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from .conftest import NAMESPACE, RELEASE, ROOT, Deployment, record_timing, skaffold_env


def _copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)


def _analyzer_image(d: Deployment) -> str:
    dep = d.cluster.json("get", "deployment", f"{RELEASE}-analyzer", "-n", NAMESPACE)
    return dep["spec"]["template"]["spec"]["containers"][0]["image"]


def _ready_pod_with(d: Deployment, image: str) -> bool:
    pods = d.cluster.json("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=analyzer")["items"]
    return any(
        p["spec"]["containers"][0]["image"] == image
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        for p in pods
    )


def test_skaffold_dev_redeploys_the_analyzer_after_a_source_edit(deployed, tmp_path):
    d = deployed
    work = tmp_path / "checkout"
    _copy_checkout(work)
    log = (ROOT / "var" / "skaffold-dev.log").open("w")
    proc = subprocess.Popen(
        ["skaffold", "dev", "-p", "local", "--default-repo", d.cluster.registry, "--cleanup=false",
         "--port-forward=off", "--status-check=true", "--trigger=polling", "--watch-poll-interval=1000"],
        cwd=work, env=skaffold_env(d.cluster), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        first = ROOT / "var" / "skaffold-dev.log"
        d.cluster.wait("skaffold dev's first deploy", 900,
                       lambda: proc.poll() is None and "Watching for changes" in first.read_text(), 2)  # fmt: skip
        before = _analyzer_image(d)
        d.cluster.wait("the first deploy's analyzer pod", 300, lambda: _ready_pod_with(d, before), 2)
        t0 = time.monotonic()
        edited = work / "services" / "analyzer" / "isplit_analyzer" / "__init__.py"
        edited.write_text(edited.read_text() + "\n# edited by test_skaffold_dev\n")
        after = d.cluster.wait("a new analyzer image", 600,
                               lambda: (img := _analyzer_image(d)) != before and img, 2)  # fmt: skip
        d.cluster.wait("a ready analyzer pod on the new image", 600, lambda: _ready_pod_with(d, after), 2)
        record_timing("skaffold_dev_edit_to_ready_pod_s", time.monotonic() - t0)
        assert after.split("@")[-1] != before.split("@")[-1], "the edit changed the image digest"
        assert proc.poll() is None, "skaffold dev is still watching"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
