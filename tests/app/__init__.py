"""Tests of the Gradio studio (app/) and of launch.py."""
