"""The control plane: durable case -> beams pipeline (store, states, dispatcher, executors).

Start with :class:`simbridge.jobs.dispatcher.Dispatcher` or the ``simbridge serve`` command.
"""
