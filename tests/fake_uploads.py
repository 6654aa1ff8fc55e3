"""The upload half of the W&B stand-in (tests/fake_wandb.py): what `wandb sync` and online runs send.

    RunResumeStatus           whether a run id exists yet (runs started with resume="allow" ask first)
    UpsertBucket              the run (id, project, config, summary) -> api.runs[run_id]
    CreateRunFiles            upload URLs for run files (`run.save`) -> api.run_files[(run_id, name)]
    CreateArtifact            a new artifact version, or the committed one with the same digest
    CreateArtifactManifest    the manifest's file record and its upload URL
    CreateArtifactFiles       upload URLs for the files the server does not hold yet (by MD5 in the collection)
    CommitArtifact            the version is committed and numbered; its aliases move to it
    PUT /storage/<key>        file bodies -> api.blobs[key]; api.puts counts them
"""

from __future__ import annotations

import base64
import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

UPLOAD_OPERATIONS = ("RunResumeStatus", "UpsertBucket", "CreateRunFiles", "CreateArtifact", "CreateArtifactManifest",
                     "CreateArtifactFiles", "CommitArtifact", "UpdateArtifactManifest")


def new_id(n: int = 8) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


@dataclass
class FakeArtifact:
    id: str
    name: str  # the collection: versions of one name are v0, v1, ...
    type: str
    digest: str
    run_id: str
    metadata: dict[str, Any]
    requested_aliases: list[str]
    version: int = 0
    state: str = "PENDING"
    aliases: list[str] = field(default_factory=list)  # after commit: "vN" and the requested ones still held
    files: dict[str, bytes] = field(default_factory=dict)  # path in the artifact -> bytes uploaded for it
    file_md5: dict[str, str] = field(default_factory=dict)  # path -> base64 MD5 the client declared
    manifest: dict[str, Any] | None = None  # the uploaded wandb_manifest.json

    @property
    def qualified(self) -> str:
        return f"{self.name}:v{self.version}"


class Uploads:
    """Mixed into FakeWandb, which provides `lock`, `url`, `entity` and `project`."""

    def init_uploads(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}  # run id -> the UpsertBucket variables merged
        self.run_files: dict[tuple[str, str], bytes] = {}  # (run id, file name) -> uploaded bytes
        self.artifacts: list[FakeArtifact] = []
        self.blobs: dict[str, bytes] = {}  # storage key -> bytes PUT there
        self.puts = 0
        self._targets: dict[str, tuple[str, Any, str]] = {}  # storage key -> ("run"|"artifact"|"manifest", owner, name)

    def _storage_url(self, kind: str, owner: Any, name: str) -> str:
        key = new_id(16)
        self._targets[key] = (kind, owner, name)
        return f"{self.url}/storage/{key}"

    def artifact(self, name: str, version: int) -> FakeArtifact:
        return next(a for a in self.artifacts if a.name == name and a.version == version and a.state == "COMMITTED")

    def versions(self, name: str) -> list[FakeArtifact]:
        return sorted((a for a in self.artifacts if a.name == name and a.state == "COMMITTED"), key=lambda a: a.version)

    def answer_upload(self, op: str, v: dict[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            if op == "RunResumeStatus":
                known = self.runs.get(v.get("name") or "")
                bucket = None if known is None else {
                    "id": new_id(), "name": v.get("name"), "summaryMetrics": "{}", "displayName": v.get("name"),
                    "logLineCount": 0, "historyLineCount": 0, "eventsLineCount": 0, "historyTail": "[]",
                    "eventsTail": "[]", "config": known.get("config") or "{}", "tags": [], "wandbConfig": "{}"}
                return {"data": {"model": {"id": "cHJvamVjdDox", "name": v.get("project") or self.project,
                                           "entity": {"id": "ZW50aXR5OjE=", "name": v.get("entity") or self.entity},
                                           "bucket": bucket}}}
            if op == "UpsertBucket":
                run_id = v.get("name") or new_id()
                run = self.runs.setdefault(run_id, {})
                run.update({k: val for k, val in v.items() if val is not None})
                project = {"id": "cHJvamVjdDox", "name": v.get("project") or self.project,
                           "entity": {"id": "ZW50aXR5OjE=", "name": v.get("entity") or self.entity}}
                bucket = {"id": base64.b64encode(f"Run:{run_id}".encode()).decode(), "name": run_id,
                          "displayName": v.get("displayName") or run_id, "description": None,
                          "config": run.get("config"), "sweepName": v.get("sweep"), "historyLineCount": 0,
                          "project": project}
                return {"data": {"upsertBucket": {"bucket": bucket, "inserted": True}}}
            if op == "CreateRunFiles":
                run_id = v.get("run") or ""
                files = [{"name": name, "uploadUrl": self._storage_url("run", run_id, name)} for name in v.get("files") or []]
                return {"data": {"createRunFiles": {"runID": run_id, "uploadHeaders": [], "files": files}}}
            if op == "CreateArtifact":
                return self._create_artifact(v.get("input") or v)
            if op in ("CreateArtifactManifest", "UpdateArtifactManifest"):
                art = next((a for a in self.artifacts if a.id == v.get("artifactID")), None)
                name = v.get("name") or "wandb_manifest.json"
                url = self._storage_url("manifest", art, name) if v.get("includeUpload", True) else None
                manifest = {"id": new_id(), "file": {"id": new_id(), "name": name, "displayName": name,
                                                  "uploadUrl": url, "uploadHeaders": []}}
                key = "createArtifactManifest" if op == "CreateArtifactManifest" else "updateArtifactManifest"
                return {"data": {key: {"artifactManifest": manifest}}}
            if op == "CreateArtifactFiles":
                return self._create_artifact_files((v.get("input") or v).get("artifactFiles") or v.get("artifactFiles") or [])
            if op == "CommitArtifact":
                art = next(a for a in self.artifacts if a.id == v.get("artifactID"))
                # versions are numbered as they are committed (uploads of one collection may run in parallel)
                art.version = sum(1 for a in self.artifacts if a.name == art.name and a.state == "COMMITTED")
                art.state = "COMMITTED"
                for other in self.artifacts:  # an alias names one version of a collection at a time
                    if other.name == art.name and other is not art:
                        other.aliases = [a for a in other.aliases if a not in art.requested_aliases]
                art.aliases = [f"v{art.version}", *art.requested_aliases]
                return {"data": {"commitArtifact": {"artifact": {"id": art.id, "digest": art.digest}}}}
        return None

    def _create_artifact(self, v: dict[str, Any]) -> dict[str, Any]:
        name = v.get("artifactCollectionName") or ""
        same = [a for a in self.artifacts if a.name == name]
        committed = [a for a in same if a.state == "COMMITTED"]
        existing = next((a for a in committed if a.digest == v.get("digest")), None)
        if existing is None:  # a new version, numbered when committed
            aliases = [a.get("alias") for a in v.get("aliases") or [] if isinstance(a, dict)]
            metadata = json.loads(v["metadata"]) if v.get("metadata") else {}
            existing = FakeArtifact(new_id(12), name, v.get("artifactTypeName") or "", v.get("digest") or "",
                                    v.get("runName") or "", metadata, aliases)
            self.artifacts.append(existing)
        latest = committed[-1] if committed else None
        sequence = {"id": "c2VxOjE=", "latestArtifact": {"id": latest.id, "versionIndex": latest.version} if latest else None}
        artifact = {"id": existing.id, "state": existing.state, "digest": existing.digest,
                    "versionIndex": existing.version, "artifactSequence": sequence}
        return {"data": {"createArtifact": {"artifact": artifact}}}

    def _create_artifact_files(self, specs: list[dict[str, Any]]) -> dict[str, Any]:
        edges = []
        for spec in specs:
            art = next(a for a in self.artifacts if a.id == spec.get("artifactID"))
            name, md5 = spec.get("name"), spec.get("md5")
            art.file_md5[name] = md5
            # the server keeps one copy per content: a file already uploaded in this collection is not asked for
            held = next((other for other in self.artifacts if other.name == art.name and other is not art
                         and other.state == "COMMITTED" and other.file_md5.get(name) == md5 and name in other.files), None)
            if held is not None:
                art.files[name] = held.files[name]
                url = None
            else:
                url = self._storage_url("artifact", art, name)
            edges.append({"node": {"id": new_id(), "name": name, "displayName": name, "uploadUrl": url,
                                   "uploadHeaders": [], "storagePath": f"artifacts/{art.id}/{name}",
                                   "uploadMultipartUrls": None, "artifact": {"id": art.id}}})
        return {"data": {"createArtifactFiles": {"files": {"edges": edges}}}}

    def store(self, key: str, body: bytes) -> bool:
        with self.lock:
            target = self._targets.get(key)
            if target is None:
                return False
            self.puts += 1
            self.blobs[key] = body
            kind, owner, name = target
            if kind == "run":
                self.run_files[(owner, name)] = body
            elif kind == "artifact":
                owner.files[name] = body
            elif kind == "manifest" and owner is not None:
                owner.manifest = json.loads(body)
            return True
