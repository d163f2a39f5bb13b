"""Downloads for data/*/get_* scripts: a fast offline check, checksummed fetches, safe extraction."""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import tarfile
import urllib.error
import urllib.request
from typing import Iterable, Sequence
from urllib.parse import urlparse

from ..errors import DataError

CONNECT_TIMEOUT_S = 4


def require_network(url: str, alternative: str) -> None:
    """Raise at once (within seconds) when the host of ``url`` cannot be reached."""
    host = urlparse(url).hostname or url
    port = 443 if url.startswith("https") else 80
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise DataError(f"no network: cannot reach {host} ({e.strerror or e})",
                        hint=alternative) from None


def md5_of(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(urls: Sequence[str], dest: str, md5: str) -> None:
    """Download ``dest`` from the first URL that answers; verify its MD5 (kept if already valid)."""
    if os.path.isfile(dest) and md5_of(dest) == md5:
        print(f"{dest}: already downloaded, checksum OK")
        return
    errors = []
    for url in urls:
        part = dest + ".part"
        try:
            print(f"downloading {url}", file=sys.stderr)
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            continue
        got = md5_of(part)
        if got != md5:
            errors.append(f"{url}: MD5 {got} instead of {md5}")
            os.remove(part)
            continue
        os.replace(part, dest)
        return
    raise DataError("download failed:\n  " + "\n  ".join(errors), where=dest,
                    hint="retry later, or download the file by hand into this folder")


def extract_members(archive: str, names: Iterable[str], dest_dir: str) -> None:
    """Extract the named files of a tar archive, flattened into ``dest_dir`` (no other paths)."""
    wanted = set(names)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted:
                with tar.extractfile(member) as src, open(os.path.join(dest_dir, base), "wb") as out:
                    out.write(src.read())
                wanted.discard(base)
    if wanted:
        raise DataError(f"archive lacks {sorted(wanted)}", where=archive,
                        hint="delete it and run the script again")
