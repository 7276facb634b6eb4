"""Queue management (the supervisor side): claim due mail from the spool, hand
batches to workers, apply outcomes, decide retries. It never speaks SMTP."""
