"""Services: the write side. Plain functions with keyword-only arguments, named <entity>_<action>."""
