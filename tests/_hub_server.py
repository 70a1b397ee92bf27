""" A minimal Hugging Face Hub for tests: the resolve protocol huggingface_hub uses to download files, and the
calls of an upload (`create_repo`, then `create_commit` with every file sent inline).

`HEAD|GET /{org}/{name}/resolve/{revision}/{path}` for repos committed with `commit(repo_id, folder)`. A commit
freezes the repo's commit hash, not its bytes: editing a served file afterwards simulates a tampered mirror.
`POST /api/repos/create`, `/api/validate-yaml`, `/api/models/{org}/{name}/preupload/{rev}` (every file
"regular", i.e. inline) and `/api/models/{org}/{name}/commit/{rev}` (ndjson, base64 contents) write the files
into the repo and commit it; `pushed[repo_id]` lists the paths of each upload.
"""
import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List
from urllib.parse import unquote


class LocalHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.commits: Dict[str, str] = {}  # repo_id -> commit hash
        self.requests: List[str] = []
        self.pushed: Dict[str, List[List[str]]] = {}  # repo_id -> the paths of each commit uploaded
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

            def do_POST(self):
                hub._receive(self)

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.endpoint = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def commit(self, repo_id: str, folder: Path = None) -> str:
        """Publish `folder` (or what is already in the repo dir) as a new commit; returns its hash."""
        target = self.repo_dir(repo_id)
        if folder is not None and Path(folder) != target:
            shutil.copytree(folder, target, dirs_exist_ok=True)
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(target.rglob('*')):
            if path.is_file():
                digest.update(path.relative_to(target).as_posix().encode() + path.read_bytes())
        self.commits[repo_id] = digest.hexdigest()
        return self.commits[repo_id]

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool):
        self.requests.append(f'{handler.command} {handler.path}')
        parts = unquote(handler.path.split('?')[0]).lstrip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._error(handler, 404, 'RepoNotFound', None)
        repo_id, revision, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
        commit = self.commits.get(repo_id)
        if commit is None:
            return self._error(handler, 404, 'RepoNotFound', None)
        if revision not in ('main', commit):
            return self._error(handler, 404, 'RevisionNotFound', None)
        path = self.repo_dir(repo_id) / filename
        if not path.is_file():
            return self._error(handler, 404, 'EntryNotFound', commit)
        data = path.read_bytes()
        handler.send_response(200)
        handler.send_header('X-Repo-Commit', commit)
        handler.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header('Content-Length', str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _receive(self, handler: BaseHTTPRequestHandler):
        self.requests.append(f'{handler.command} {handler.path}')
        body = handler.rfile.read(int(handler.headers.get('Content-Length') or 0))
        parts = unquote(handler.path.split('?')[0]).lstrip('/').split('/')
        if parts[:3] == ['api', 'repos', 'create']:
            payload = json.loads(body)
            repo_id = '/'.join(filter(None, (payload.get('organization'), payload['name'])))
            self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)
            return self._json(handler, {'url': f'{self.endpoint}/{repo_id}'})
        if parts[:2] == ['api', 'validate-yaml']:  # the model card's metadata; the real Hub may warn, this one doesn't
            return self._json(handler, {'warnings': []})
        if len(parts) < 6 or parts[:2] != ['api', 'models'] or parts[4] not in ('preupload', 'commit'):
            return self._error(handler, 404, 'RepoNotFound', None)
        repo_id = '/'.join(parts[2:4])
        if not self.repo_dir(repo_id).is_dir():
            return self._error(handler, 404, 'RepoNotFound', None)
        if parts[4] == 'preupload':
            files = json.loads(body)['files']
            return self._json(handler, {'files': [
                {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
        paths = []
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item['key'] == 'file':
                target = self.repo_dir(repo_id) / item['value']['path']
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(item['value']['content']))
                paths.append(item['value']['path'])
        self.pushed.setdefault(repo_id, []).append(paths)
        commit = self.commit(repo_id)
        return self._json(handler, {'commitOid': commit, 'commitUrl': f'{self.endpoint}/{repo_id}/commit/{commit}'})

    @staticmethod
    def _json(handler, payload):
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header('Content-Type', 'application/json')
        handler.send_header('Content-Length', str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _error(handler, status: int, code: str, commit):
        handler.send_response(status)
        handler.send_header('X-Error-Code', code)
        handler.send_header('X-Error-Message', f'{code} (local test hub)')
        if commit:
            handler.send_header('X-Repo-Commit', commit)
        handler.send_header('Content-Length', '0')
        handler.end_headers()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
