"""Every http(s) address in the project's code is listed in public_address_statement.md."""
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = re.compile(r"https?://[^\s'\"`<>()\[\]{},]+")
CODE = (".py", ".sh", ".yaml", ".yml", ".txt", ".cfg", ".toml", ".json", ".ini")


def code_addresses():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    found = {}
    for f in files:
        if not f.endswith(CODE) and not f.startswith(".ci/"):
            continue
        path = os.path.join(REPO, f)
        if not os.path.isfile(path):
            continue
        for url in URL.findall(open(path, encoding="utf-8", errors="replace").read()):
            found.setdefault(url.rstrip(".:;"), set()).add(f)
    return found


def test_statement_lists_every_address():
    statement = open(os.path.join(REPO, "public_address_statement.md"), encoding="utf-8").read()
    missing = {u: sorted(f) for u, f in code_addresses().items() if u not in statement}
    assert not missing, f"add these to public_address_statement.md: {missing}"


def test_the_check_finds_addresses():
    # Guard against a regex that silently matches nothing: this very file names an address.
    sample = "see https://example.org/a_b?x=1 and 'http://h:8/p'."
    assert [u.rstrip(".:;") for u in URL.findall(sample)] == ["https://example.org/a_b?x=1", "http://h:8/p"]
