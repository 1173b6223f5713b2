# Registers the scheduled task "bridge-agent": `bridge-agent.exe run` at your logon, under your account,
# restarted when it stops, and starts it now. Run `bridge-agent.exe login` first.
#
#   powershell -ExecutionPolicy Bypass -File .\install-logon-task.ps1 [-AgentArgs "--port COM7"]
param(
    # Extra options of `bridge-agent.exe run`, e.g. "--port COM7 --udp 192.0.2.10:50000".
    [string]$AgentArgs = ""
)
$ErrorActionPreference = "Stop"

$exe = Join-Path $PSScriptRoot "bridge-agent.exe"
if (-not (Test-Path $exe)) { throw "bridge-agent.exe is not next to this script ($PSScriptRoot)" }

$user = [System.Security.Principal.WindowsIdentity]::GetCurrent().Name
$action = New-ScheduledTaskAction -Execute $exe -Argument ("run " + $AgentArgs).Trim() -WorkingDirectory $PSScriptRoot
$trigger = New-ScheduledTaskTrigger -AtLogOn -User $user
# No time limit, restarts every minute after a failure, and it keeps running on battery (a laptop on a car).
$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit ([TimeSpan]::Zero) `
    -RestartCount 9999 -RestartInterval (New-TimeSpan -Minutes 1) `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries -MultipleInstances IgnoreNew
# Interactive: runs in your logon session, with your credentials, which DPAPI needs to unseal the vault's
# key (an S4U task has no access to encrypted data). Its console window can be minimised; closing it
# stops the agent until the next logon.
$principal = New-ScheduledTaskPrincipal -UserId $user -LogonType Interactive -RunLevel Limited

Register-ScheduledTask -TaskName "bridge-agent" -Description "Remote CAN bridge agent" `
    -Action $action -Trigger $trigger -Settings $settings -Principal $principal -Force | Out-Null
Start-ScheduledTask -TaskName "bridge-agent"
Write-Host "bridge-agent runs now and at every logon of $user; `bridge-agent.exe status` shows what it serves."
