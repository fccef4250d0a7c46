"""Sweep: not built yet."""

import streamlit as st

st.title("Sweep")
st.info("This page is being built.")
