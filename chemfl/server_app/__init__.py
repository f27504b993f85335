"""The ServerApp (component `chemfl.server_app.app:app`): owns the global adapter, runs the strategy,
evaluates centrally, writes outputs. Importing this package loads nothing: the aggregation maths
(`aggregation`) and rules (`rules`) stay free of Flower and torch."""
