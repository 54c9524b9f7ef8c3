"""plcli"""
