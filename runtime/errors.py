"""The error a request (or a plan entry) raises alone: the bottom of the runtime's imports."""


class RequestError(ValueError):
    """A request (or a plan entry) was invalid; raised for that call alone, nothing else changes."""
