"""engine-serve in a child process for the tests: started on a free port (--port 0), its URL read from the line
it prints when ready, the official openai client and raw HTTP pointed at it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from support import ROOT, TINY

ENGINE_ARGS = ["--model", TINY, "--device", "cpu", "--max-model-len", "96", "--max-num-seqs", "8"]


class Server:
    """engine-serve in a child process: its base URL once it says it is ready, its stderr kept."""

    def __init__(self, *args, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.apps.serve.cli", *args, "--port", "0"], cwd=ROOT,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        deadline = time.monotonic() + 240
        while True:
            line = self.proc.stderr.readline()
            self.lines.append(line)
            found = re.search(r" at (http://\S+) ", line)
            if found:
                self.url = found.group(1)
                break
            assert line and time.monotonic() < deadline, "".join(self.lines) + self.proc.stderr.read()
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def post(self, path: str, body, headers: dict | None = None) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)
