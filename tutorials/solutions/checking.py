"""The one helper the solutions files share: a check must reject the classic mistake."""


def must_fail(check, *wrong):
    """Run ``check(*wrong)``; it must reject the wrong answer, with an assertion or with an error
    such as a shape mismatch. A stub that raises NotImplementedError is not an answer."""
    try:
        check(*wrong)
    except NotImplementedError:
        raise
    except Exception as err:
        print(f"  a mistake caught: {str(err).splitlines()[0]}")
        return
    raise AssertionError("the check accepted a wrong answer")
