"""What every command shares: one message for an input error, the traceback on request."""
