""" A minimal Hugging Face Hub for tests: the resolve protocol huggingface_hub uses to download files.

`HEAD|GET /{org}/{name}/resolve/{revision}/{path}` for repos committed with `commit(repo_id, folder)`. A commit
freezes the repo's commit hash, not its bytes: editing a served file afterwards simulates a tampered mirror.
"""
import hashlib
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
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

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
