"""Publish: not built yet."""

import streamlit as st

st.title("Publish")
st.info("This page is being built.")
