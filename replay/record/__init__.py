"""Writing a recording: the Recorder, its writer, conversion and validation of rows.

Nothing here imports a query engine, an inference engine or an ML framework.
"""
