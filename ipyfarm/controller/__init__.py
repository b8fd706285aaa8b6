"""The controller: a pure state machine (``state``) inside a thin I/O shell (``hub``)."""
