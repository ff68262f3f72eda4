"""Checkers for the exercises at the end of each notebook: the test is the grader.

Each lesson has a module (``lesson01``, ``lesson02``, ...) with one small function per
exercise. You call it on your answer; it works the answer out again its own way (from the
package, or from the definitions) and either says your answer is right or tells you what
is off. Called with ``None`` (the exercise cell before you have written anything), it
says what it expects and does nothing else, so a notebook runs top to bottom unanswered.

    from dalle_lesson.exercises import lesson04
    lesson04.check_conv_keys(middle=61, corner=1)   # Correct: ...

Worked solutions that call every checker live in notebooks/solutions/.
"""

from __future__ import annotations


def unanswered(*answers, expects: str) -> bool:
    """True, with a note of what is expected, while any answer is still ``None``.

    >>> unanswered(None, expects="the number of keys")
    Not answered yet: the number of keys. Write your answer, then run the cell again.
    True
    """
    if any(answer is None for answer in answers):
        print(f"Not answered yet: {expects}. Write your answer, then run the cell again.")
        return True
    return False


def correct(message: str) -> None:
    """What a checker prints when the answer passes.

    >>> correct("61 keys in the middle, 1 in the corner")
    Correct: 61 keys in the middle, 1 in the corner
    """
    print(f"Correct: {message}")
