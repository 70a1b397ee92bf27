""" The one check of the error contract: a user's ordinary mistake ends in exactly one line
`error: <what was wrong>; <what to do>`, exit status 2, no traceback. """
import re


def assert_one_error_line(code: int, stderr: str, *patterns: str, alone: bool = False) -> str:
    """Asserts exit status 2, no traceback and exactly one `error: ...; ...` line matching every regex pattern
    (with `alone`, nothing else on stderr either, as a subprocess's stderr should be); returns the line."""
    assert code == 2, stderr
    assert 'Traceback' not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and '; ' in errors[0], stderr
    assert not alone or len(lines) == 1, stderr
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]
