-- Argo CD health check for AlignmentRuns. Add it to the argocd-cm ConfigMap:
--
--   data:
--     resource.customizations.health.alignment.dev_AlignmentRun: |
--       <this file>
--
-- Healthy: the run succeeded. Degraded: a stage failed (Stalled). Suspended: spec.suspend.
-- Progressing: everything else (stages left to run, waiting for Kueue, a spec not yet observed).
local hs = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "the operator has not observed the latest spec yet"
  return hs
end
local conditions = {}
for _, c in ipairs(obj.status.conditions or {}) do
  conditions[c.type] = c
end
if conditions.Stalled ~= nil and conditions.Stalled.status == "True" then
  hs.status = "Degraded"
  -- a failed stage's words, else why it stalled (a run whose promote gates failed: Held, GatesNotMet)
  hs.message = (conditions.Failed and conditions.Failed.status == "True" and conditions.Failed.message)
    or conditions.Stalled.message
elseif conditions.Ready ~= nil and conditions.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "run succeeded; model " .. (obj.status.model or "")
elseif obj.status.phase == "Suspended" and obj.spec.suspend then
  hs.status = "Suspended"
  hs.message = "suspended (spec.suspend)"
else
  hs.message = "stage " .. (obj.status.currentStage or "?") .. ": " .. (obj.status.phase or "Pending")
end
return hs
