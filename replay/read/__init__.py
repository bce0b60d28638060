"""Reading a recording: ``open_recording``, the SQL views, and what a recording supports.
"""
