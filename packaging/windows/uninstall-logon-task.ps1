# Stops and removes the scheduled task "bridge-agent" made by install-logon-task.ps1. The agent's folder
# (%APPDATA%\bridge-agent) is kept; `bridge-agent.exe logout` forgets the credentials.
$ErrorActionPreference = "Stop"
if (Get-ScheduledTask -TaskName "bridge-agent" -ErrorAction SilentlyContinue) {
    Stop-ScheduledTask -TaskName "bridge-agent"
    Unregister-ScheduledTask -TaskName "bridge-agent" -Confirm:$false
    Write-Host "the bridge-agent task is removed"
} else {
    Write-Host "there is no bridge-agent task"
}
