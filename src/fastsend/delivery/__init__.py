"""Delivery: everything a worker process does (resolve, connect, send, report).

Workers never open the spool; they get batches from the supervisor through a
shared-memory ring and send outcomes back the same way.
"""
